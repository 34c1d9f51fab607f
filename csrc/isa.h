// One module, its kernels compiled for every ISA level, the level chosen at run time.
//
// A source <name>.cpp includes every header its kernels need, defines FASTDD_KERNELS as the file of its kernels
// ("<name>_kernels.h") and includes this file, which includes the kernels once per level, each copy in a namespace
// of its own compiled for that level's instructions:
//   level_default  the architecture's baseline (on x86-64: SSE2)
//   level_avx2     AVX2 and FMA (x86-64 only)
//   level_avx512   AVX-512 F, BW, VL and DQ, and FMA, as ATen's AVX512 level (x86-64 only); GCC vectorises its
//                  loops 256 bits wide, as it does for every AVX-512 core it tunes for
// Only the code of the kernels file is compiled per level: torch's and the standard library's inline functions keep
// the baseline's instructions (a level's code may inline them, never the reverse), so no function outside the
// namespaces level_avx2 and level_avx512 holds an instruction above the baseline.
//
// Each copy sees kVectorBytes, the width of its level's vector registers (16, 32, 64), for kernels that size
// vectors explicitly.
//
// FASTDD_BY_LEVEL(fn) is a function with the signature of the kernels' fn that calls the copy of the level in use;
// bind_levels(m) adds set_level(name) and level() to the module. The level starts at "default"; the Python loader
// sets it once after import (fastdd/ops/_backend.py).
//
// The levels above the baseline take GCC's or Clang's target pragmas on x86-64. Elsewhere the module has the
// baseline only, and the loader asks for no other level there.

#include <algorithm>
#include <array>
#include <iterator>
#include <string>
#include <utility>

#if defined(__x86_64__) && defined(__GNUC__)  // GCC, and Clang, which defines __GNUC__ too
#define FASTDD_X86_LEVELS 1
#else
#define FASTDD_X86_LEVELS 0
#endif

#if FASTDD_X86_LEVELS
// FASTDD_TARGET_BEGIN(isa) ... FASTDD_TARGET_END: every function defined between them, lambdas included, is
// compiled for the instruction sets isa.
#define FASTDD_PRAGMA(text) _Pragma(#text)
#if defined(__clang__)
#define FASTDD_TARGET_BEGIN(isa) FASTDD_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define FASTDD_TARGET_END FASTDD_PRAGMA(clang attribute pop)
#define FASTDD_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,fma"
#else
#define FASTDD_TARGET_BEGIN(isa) FASTDD_PRAGMA(GCC push_options) FASTDD_PRAGMA(GCC target(isa))
#define FASTDD_TARGET_END FASTDD_PRAGMA(GCC pop_options)
#define FASTDD_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,fma,prefer-vector-width=256"
#endif
// The kernels' vectors (norm_relu_pool) pass by value only between functions of one level inside this module: the
// note on their ABI concerns no caller.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace {

namespace level_default {
constexpr int kVectorBytes = 16;  // the widest vector register: SSE2's
#include FASTDD_KERNELS
}  // namespace level_default

#if FASTDD_X86_LEVELS
FASTDD_TARGET_BEGIN("avx2,fma")
namespace level_avx2 {
constexpr int kVectorBytes = 32;
#include FASTDD_KERNELS
}  // namespace level_avx2
FASTDD_TARGET_END

FASTDD_TARGET_BEGIN(FASTDD_AVX512)
namespace level_avx512 {
constexpr int kVectorBytes = 64;
#include FASTDD_KERNELS
}  // namespace level_avx512
FASTDD_TARGET_END

constexpr const char* kLevels[] = {"default", "avx2", "avx512"};
#define FASTDD_BY_LEVEL(fn) by_level(&level_default::fn, &level_avx2::fn, &level_avx512::fn)
#else
constexpr const char* kLevels[] = {"default"};
#define FASTDD_BY_LEVEL(fn) by_level(&level_default::fn)
#endif

int level = 0;  // the index in kLevels of the level in use

// A function with the signature of the given ones, one per level in the order of kLevels, that calls the level's.
template <typename R, typename... Args, typename... More>
auto by_level(R (*first)(Args...), More... more) {
  static_assert(1 + sizeof...(More) == std::size(kLevels), "one function per level");
  return [fns = std::array{first, more...}](Args... args) -> R { return fns[level](std::forward<Args>(args)...); };
}

void bind_levels(pybind11::module_& m) {
  m.def(
      "set_level",
      [](const std::string& name) {
        const auto found = std::find(std::begin(kLevels), std::end(kLevels), name);
        TORCH_CHECK(found != std::end(kLevels), "set_level: a level this module is built for expected, got ", name);
        level = static_cast<int>(found - std::begin(kLevels));
      },
      "run the kernels at the named ISA level from now on: default, and on x86-64 avx2 or avx512");
  m.def("level", [] { return std::string(kLevels[level]); }, "the ISA level the kernels run at");
}

}  // namespace

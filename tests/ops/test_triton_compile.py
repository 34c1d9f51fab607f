"""Every Triton kernel at every specialisation its launchers can choose, compiled ahead of time for sm_80 and
sm_90 (no GPU needed; fastdd.kernels.resources): no compile error, no spilled register, no stack frame, no more
shared memory than a block may have."""

from __future__ import annotations

import pytest
from fastdd.kernels import resources

pytest.importorskip("triton", reason="the kernels are Triton's")


def test_every_specialisation_compiles_for_sm80_and_sm90_without_spills():
    missing = resources.toolchain_missing()
    if missing:
        pytest.skip(missing)
    measured = resources.measure()
    assert {r.target for r in measured} == {"sm_80", "sm_90"}
    bad = [f"{r.kernel} [{r.config}] {r.target}: {'; '.join(resources.problems(r))}"
           for r in measured if resources.problems(r)]
    assert not bad, "\n".join(bad)


def test_launchers_choose_only_the_listed_tiles():
    """The tile sizes the launchers derive from a shape are among those compiled above, for any shape."""
    from fastdd.kernels import masked_contrastive, norm_relu_pool

    sizes = [*range(1, 5000), 224 * 224, 10**7]
    for module, choose, name in ((norm_relu_pool, norm_relu_pool.block, "BLOCK"),
                                 (masked_contrastive, masked_contrastive._block_l, "BLOCK_L")):
        listed = {config.constexprs[name] for config in module.launch_configs()}
        assert {choose(size) for size in sizes} == listed, module.__name__

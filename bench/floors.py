"""The two floors of this machine that bench/NOTES.md divides by: matmul rate and copy bandwidth.

    python bench/floors.py [--device cpu|cuda]

FLOP floor of a case = its FLOPs / the matmul rate; byte floor = the bytes it must move / the copy
bandwidth (a copy into a resident buffer reads and writes each byte once: 2 x size per copy).
"""

from __future__ import annotations

import argparse

import torch

from harness.measure import machine, median_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    device = p.parse_args().device
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul = 2 * n**3 / median_seconds(lambda: a @ b, device, repeat=5)
    big = torch.randn(64 * 2**20, device=device)  # 256 MiB, far beyond any cache
    dst = torch.empty_like(big)  # resident already: page faults are not bandwidth
    copy = 2 * big.numel() * 4 / median_seconds(lambda: dst.copy_(big), device, repeat=5)
    print(f"{machine(device)}: fp32 matmul {matmul / 1e9:.0f} GFLOP/s, copy {copy / 1e9:.1f} GB/s (read + write)")


if __name__ == "__main__":
    main()

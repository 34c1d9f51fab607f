"""Triton kernels of fastdd, importable as ``fastdd.kernels``."""

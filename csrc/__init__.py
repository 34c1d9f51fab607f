"""C++ (CPU) sources of the fused ops, compiled on first use by fastdd.ops._backend.load_extension."""

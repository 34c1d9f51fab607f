"""C++ (CPU) sources of the fused ops, compiled when fastdd is installed (setup.py), else on first use by
fastdd.ops._backend.load_extension."""

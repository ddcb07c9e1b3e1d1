"""CPU kernels (C, AVX-512, OpenMP)."""

"""Fused kernels for minibloom. Never imports minibloom."""

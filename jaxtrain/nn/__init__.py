"""Flax models of the lessons and the CPU-fast convolution and matmul they use."""

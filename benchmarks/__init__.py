"""Benchmarks of jaxtrain against a per-step ``jax.jit`` loop and PyTorch.

    uv run python -m benchmarks.run [--only NAME] [--repeats N] [--out BENCHMARKS.md]

``benchmarks.baselines`` holds the per-step jit loops written the way the Flax
examples do; ``benchmarks.torch_baselines`` the PyTorch recipes (standalone:
runs under any Python with torch and numpy).
"""

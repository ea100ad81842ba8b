"""Benchmarks of jaxtrain against a per-step ``jax.jit`` loop and PyTorch.

    uv run python -m benchmarks.run [--only NAME] [--repeats N] [--out BENCHMARKS.md]

``benchmarks.run`` starts one worker process per row and writes the report;
``benchmarks.workloads`` defines what is measured, ``benchmarks.workers`` (with
``benchmarks.timing``) times one row, ``benchmarks.report`` builds the tables.
``benchmarks.baselines`` holds the per-step jit loops written the way the Flax
examples do; ``benchmarks.torch_baselines`` the PyTorch recipes (standalone:
runs under any Python with torch and numpy).
"""

"""Runnable recipes: ``uv run python -m experiments.NAME --help``."""

import sys

if sys.argv[:1] == ["-m"]:  # python -m experiments.NAME: signals stop, from now on
  from experiments import _signals

  _signals.install()

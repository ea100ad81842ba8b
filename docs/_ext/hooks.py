"""MkDocs hooks: the experiments' command-line reference, generated from their
parsers at every build, so it cannot drift from the code.

A line ``<!-- cli: NAME -->`` in a page becomes the output of
``python -m experiments.NAME --help``. The build fails if an experiment has no
such line, or if one names no experiment.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys

MARKER = re.compile(r"^<!-- cli: (\w+) -->$", re.MULTILINE)
REPO = pathlib.Path(__file__).resolve().parents[2]


def experiments() -> list[str]:
  """Every runnable experiment: the modules of experiments/ not starting with _."""
  return sorted(p.stem for p in (REPO / "experiments").glob("*.py") if not p.stem.startswith("_"))


def cli_help(name: str) -> str:
  """``python -m experiments.NAME --help``, as a user's 100-column terminal shows it."""
  env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(REPO)}
  env.pop("FORCE_COLOR", None)
  out = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--help"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120,
                       check=False)
  if out.returncode != 0:
    raise RuntimeError(f"python -m experiments.{name} --help exited {out.returncode}:\n"
                       f"{out.stderr[-2000:]}")
  # tyro names the program by its path: show the command a user types.
  return re.sub(r"^usage: \S+", f"usage: python -m experiments.{name}", out.stdout, count=1)


def on_page_markdown(markdown: str, page, config, files) -> str:
  names = MARKER.findall(markdown)
  if not names:
    return markdown
  known = experiments()
  unknown = sorted(set(names) - set(known))
  missing = sorted(set(known) - set(names))
  if unknown or missing:
    raise ValueError(f"{page.file.src_path}: CLI markers for no experiment {unknown}, "
                     f"experiments without a marker {missing}")
  with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
    helps = dict(zip(names, pool.map(cli_help, names)))
  return MARKER.sub(lambda m: f"```text\n{helps[m.group(1)].rstrip()}\n```", markdown)

"""The report of ``benchmarks.run``: tables, MUST verdicts, the environment.

Rates use the steady-state time of the whole workload (training and its
evaluations): steps/s = training steps / time, examples/s = steps/s * batch
size. "compile s" is the first run minus the steady-state median.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import pathlib
import platform
import statistics
import subprocess

from benchmarks.workloads import MATMUL_N, ROOT, Workload


def median(xs):
  return statistics.median(xs) if xs else float("nan")


def _fmt(x, digits=3):
  if x is None or (isinstance(x, float) and x != x):
    return "-"
  if abs(x) >= 1000:
    return f"{x:,.0f}"
  if abs(x) >= 100:
    return f"{x:.0f}"
  if abs(x) >= 10:
    return f"{x:.1f}"
  return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.2f}"


# ----------------------------------------------------------------------------
# Tables and verdicts.
# ----------------------------------------------------------------------------


def table(workload: Workload, results: dict[str, dict]) -> tuple[list[str], list[str]]:
  """Markdown lines of one workload's table, and MUST verdict lines."""
  lines, notes = [], []
  name = workload.name
  if name == "cli":
    return _cli_table(workload, results)
  base = results.get("jit", {})
  base_s = median(base.get("times", []))
  flops = 6 * 256 * (784 * 1024 + 1024 * 1024 + 1024 * 10) if name == "mlp" else None
  header = ["row", "steps/s", "examples/s", "compile s", "end-to-end s (1st run)",
            "steady s (median)", "2nd run s", "peak RSS MB", "vs jit loop"]
  if name == "seeds":
    header[1:3] = ["model-steps/s", "model-examples/s"]
  if flops:
    header += ["GFLOP/s", "matmul GFLOP/s", "% of matmul"]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  for row in workload.rows:
    r = results.get(row.key)
    if r is None:
      continue
    if "error" in r:
      lines.append(f"| {row.label} | " + r["error"].replace("|", "/")[:200]
                   + " |" * (len(header) - 1))
      continue
    steady = median(r["times"])
    models = r.get("models", 1)
    steps_s = models * r["steps"] / steady
    label = row.label
    if r.get("execution") and row.key == "fit":
      label += f" [{r['execution']}]"
    cells = [label, _fmt(steps_s), _fmt(steps_s * r["batch"]),
             _fmt(r["first_s"] - steady), _fmt(r["first_s"]), _fmt(steady),
             _fmt(r["second_s"]) + (f" ({r['compiles_second']} compiles)"
                                    if r.get("compiles_second") else ""),
             _fmt(r["rss_mb"]), _fmt(base_s / steady) + "x" if base_s == base_s else "-"]
    if flops:
      gflops = flops * r["steps"] / steady / 1e9
      matmul = r.get("matmul_s") or []
      peak = 2 * MATMUL_N ** 3 / median(matmul) / 1e9 if matmul else float("nan")
      cells += [_fmt(gflops), _fmt(peak), f"{100 * gflops / peak:.0f}%" if matmul else "-"]
      r["gflops"], r["peak_gflops"] = gflops, peak
    r["steady_s"], r["steps_s"] = steady, steps_s
    lines.append("| " + " | ".join(cells) + " |")
  notes += _verdicts(workload, results)
  return lines, notes


def _cli_table(workload, results):
  lines = ["| row | steady s (median of warm-cache runs) | end-to-end s (1st run, cold cache) "
           "| runs | peak RSS MB |", "|---|---|---|---|---|"]
  notes = []
  r = results.get("cli")
  if r and "error" not in r:
    steady = median(r["times"])
    r["steady_s"] = steady
    lines.append(f"| {workload.rows[0].label} | {_fmt(steady)} | {_fmt(r['first_s'])} | "
                 f"{', '.join(_fmt(t) for t in r['times'])} | {_fmt(r['rss_mb'])} |")
  elif r:
    lines.append(f"| {workload.rows[0].label} | {r['error']} | | | |")
  c = results.get("compiles")
  if c and "error" not in c:
    counts = c["compiles"]
    lines.append("")
    lines.append("| epochs | XLA compilations | traces |")
    lines.append("|---|---|---|")
    for epochs, k in counts.items():
      lines.append(f"| {epochs} | {k['compile']} | {k['trace']} |")
  notes += _verdicts(workload, results)
  return lines, notes


def _verdicts(workload: Workload, results) -> list[str]:
  """One line per MUST: met / NOT met, with the numbers."""
  def steady(key):
    r = results.get(key, {})
    return r.get("steady_s") if "error" not in r else None

  def best_torch():
    keys = [k for k in ("torch", "torch1") if steady(k)]
    return min(keys, key=steady) if keys else None

  name = workload.name
  out = []

  def verdict(ok, text):
    out.append(f"- MUST {workload.must}: **{'met' if ok else 'NOT met'}** ({text})")

  fit_keys = [r.key for r in workload.rows if r.kind == "fit" and steady(r.key)]
  if not fit_keys and name not in ("seeds", "cli"):
    return [f"- MUST {workload.must}: not measured"]
  if name in ("two_moons", "pigeon"):
    if steady("jit"):
      ratio = steady("jit") / steady("fit")
      need = 8 if name == "two_moons" else 2
      verdict(ratio >= need, f"default fit {ratio:.1f}x the per-step jit loop, need {need}x")
  elif name == "pigeon_every_step":
    t = best_torch()
    if t:
      ratio = steady(t) / steady("fit")
      verdict(ratio >= 3, f"default fit {ratio:.1f}x the faster PyTorch row ({t}), need 3x")
    else:
      out.append(f"- MUST {workload.must}: PyTorch not measured")
  elif name == "mlp":
    r = results.get("fit", {})
    if "gflops" in r:
      share = r["gflops"] / r["peak_gflops"]
      verdict(share >= 0.85, f"default fit {r['gflops']:.0f} GFLOP/s = {100 * share:.0f}% "
              f"of {r['peak_gflops']:.0f}")
  elif name in ("cnn", "cnn_issue", "flax_cnn"):
    # Rows may time different numbers of steps per run: compare steps/s.
    def rate(key):
      r = results.get(key, {})
      return r["steps"] / r["steady_s"] if steady(key) and r.get("steps") else 0.0

    torch_keys = [k for k in ("torch", "torch1") if rate(k)]
    t = max(torch_keys, key=rate) if torch_keys else None
    best = max(fit_keys, key=rate)
    if t:
      ratio = rate(best) / rate(t)
      first = rate(fit_keys[0]) / rate(t)
      verdict(ratio >= 1.0, f"best jaxtrain row ({best}) {ratio:.2f}x the faster PyTorch "
              f"row ({t}) in steps/s; row {fit_keys[0]} {first:.2f}x")
    else:
      out.append(f"- MUST {workload.must}: PyTorch not measured")
  elif name.startswith("stream_"):
    for key in ("fit_stream", "fit_stream_npy"):
      if steady(key) and steady("fit"):
        ratio = steady("fit") / steady(key)
        verdict(ratio >= 0.9, f"{key} {ratio:.2f}x the resident row's steps/s")
  elif name == "seeds":
    if steady("many") and steady("fit_seq"):
      ratio = steady("fit_seq") / steady("many")
      verdict(ratio >= 8, f"{ratio:.1f}x, both compiled")
  elif name == "cli":
    r, c = results.get("cli", {}), results.get("compiles", {})
    if "steady_s" in r:
      verdict(r["steady_s"] < 2.5, f"median {r['steady_s']:.2f} s")
    if "compiles" in c:
      k = c["compiles"]
      grows = k["100"]["compile"] > k["10"]["compile"]
      out.append(f"- compilations 10 vs 100 epochs: "
                 f"{'grow' if grows else 'do not grow'} with epochs")
  return out


# ----------------------------------------------------------------------------
# Environment, preamble and the markdown file.
# ----------------------------------------------------------------------------


def environment(torch_how) -> dict:
  import flax
  import jax
  import numpy
  import optax
  info = {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
      "cpu": _cpu_name(), "cores": os.cpu_count(),
      "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
      "python": platform.python_version(), "jax": jax.__version__,
      "jaxlib": importlib.metadata.version("jaxlib"), "flax": flax.__version__,
      "optax": optax.__version__, "numpy": numpy.__version__,
      "backend": jax.default_backend(), "commit": _git_state(),
  }
  if torch_how == "in-process":
    import torch
    info["torch"] = torch.__version__
  return info


def _git_state() -> str:
  """The commit measured, and whether jaxtrain/ differs from it."""
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "jaxtrain"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown (not a git checkout)"
  return commit + (" with uncommitted changes in jaxtrain/" if dirty else "")


def _cpu_name() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def preamble(env_info, torch_how, repeats) -> list[str]:
  torch_line = {"in-process": f"PyTorch {env_info.get('torch')} in this interpreter",
                None: "PyTorch not available: its rows are omitted"}.get(
      torch_how if isinstance(torch_how, str) or torch_how is None else "",
      f"PyTorch via {torch_how[0] if torch_how else ''}")
  return [
      "## Results",
      "",
      f"- Date: {env_info['date']}",
      f"- Machine: {env_info['cpu']}, {env_info['cores']} cores, "
      f"{env_info['memory_gb']} GiB, backend {env_info['backend']}; load average "
      f"(1/5/15 min) at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
      f"- Versions: Python {env_info['python']}, jax {env_info['jax']}, jaxlib "
      f"{env_info['jaxlib']}, flax {env_info['flax']}, optax {env_info['optax']}, numpy "
      f"{env_info['numpy']}; {torch_line}",
      f"- jaxtrain: commit {env_info['commit']}",
      f"- Each row: a fresh worker process; first run, second run, then {repeats} timed "
      f"runs whose median is the steady-state time.",
      "",
  ]


BEGIN, END = "<!-- benchmarks.run: begin -->", "<!-- benchmarks.run: end -->"


def write_markdown(path: pathlib.Path, lines: list[str]) -> None:
  """Replaces the generated section of ``path`` (or writes the file)."""
  body = "\n".join([BEGIN, *lines, END]) + "\n"
  if path.exists():
    text = path.read_text()
    if BEGIN in text and END in text:
      head, rest = text.split(BEGIN, 1)
      tail = rest.split(END, 1)[1]
      path.write_text(head + body.rstrip("\n") + tail)
      return
    path.write_text(text.rstrip("\n") + "\n\n" + body)
    return
  path.write_text("# Benchmarks\n\n" + body)

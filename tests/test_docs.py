"""The documentation: every code block of the site and the README runs, the site
builds strictly and offline, and every public name has a docstring.

A page's blocks run in order, as one script, in a fresh working directory:
``python`` blocks in one namespace, ``bash`` blocks with bash (``uv run CMD`` runs
CMD in this environment). A block preceded by the line
``<!-- not-run: REASON -->`` is not run (a server, an install, data this machine
may lack); ``text`` blocks are output, not code. See docs/about-docs.md.
"""

import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

import jaxtrain

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_ext" not in p.parts) + [REPO / "README.md"]

RUN = {"python", "bash"}
NOT_CODE = {"text", "toml", "json", "csv", "yaml"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+)(?P<lang>[\w+-]*)[^\n]*\n"
                   r"(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$", re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"<!-- not-run: [^>]*\S[^>]*-->\s*$")
# `uv run CMD` runs CMD here: the environment under test, not a fresh `uv` resolve.
BASH_PRELUDE = 'set -euo pipefail\nuv() { if [ "$1" = run ]; then shift; fi; "$@"; }\n'


def code_blocks(path: pathlib.Path) -> list[tuple[int, str, str, bool]]:
  """(line, language, source, runs) of every fenced block of a page."""
  text = path.read_text()
  blocks = []
  for match in FENCE.finditer(text):
    line = text.count("\n", 0, match.start()) + 1
    before = text[:match.start()].rstrip("\n \t").rsplit("\n", 1)[-1]
    body = "\n".join(l[len(match["indent"]):] for l in match["body"].splitlines())
    blocks.append((line, match["lang"], body, not NOT_RUN.search(before)))
  return blocks


def _page_id(path: pathlib.Path) -> str:
  return str(path.relative_to(REPO))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_code_block_runs(page, tmp_path, monkeypatch):
  blocks = code_blocks(page)
  unknown = [(line, lang) for line, lang, _, _ in blocks if lang not in RUN | NOT_CODE]
  assert not unknown, f"{_page_id(page)}: blocks of no known language (line, lang): {unknown}"
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("PYTHONPATH", str(REPO))
  monkeypatch.setenv("PATH", f"{pathlib.Path(sys.executable).parent}{os.pathsep}"
                     f"{os.environ['PATH']}")
  namespace = {"__name__": "__docs__"}
  for line, lang, source, runs in blocks:
    where = f"{_page_id(page)}:{line}"
    if not runs or lang not in RUN:
      continue
    if lang == "python":
      exec(compile(source, where, "exec"), namespace)  # noqa: S102
    else:
      out = subprocess.run(["bash", "-c", BASH_PRELUDE + source], capture_output=True,
                           text=True, timeout=300, check=False)
      assert out.returncode == 0, f"{where} exited {out.returncode}:\n{out.stdout[-3000:]}" \
                                  f"\n{out.stderr[-3000:]}"


def test_the_block_finder_sees_markers_and_indented_blocks(tmp_path):
  page = tmp_path / "p.md"
  page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- not-run: a server -->\n```bash\n"
                  "serve\n```\n\n- item\n\n    ```text\n    out\n    ```\n")
  assert code_blocks(page) == [(3, "python", "x = 1", True), (8, "bash", "serve", False),
                               (14, "text", "out", True)]


def test_site_builds_strictly_and_offline(tmp_path):
  """`mkdocs build --strict`: a broken link, an unresolved reference, a page left
  out of the nav or a failing CLI page is an error."""
  site = tmp_path / "site"
  env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
  out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                        "--site-dir", str(site)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  # Offline: nothing the pages load (scripts, styles, fonts, images) comes from elsewhere.
  remote = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=["']?(?:https?:)?//""")
  fetched = [str(p.relative_to(site)) for p in site.rglob("*.html") if remote.search(p.read_text())]
  assert not fetched, f"pages that load something from another host: {fetched}"
  css = "".join(p.read_text() for p in site.rglob("*.css"))
  assert "@import url(" not in css and "fonts.googleapis" not in css
  # The CLI reference is each experiment's own --help.
  cli = (site / "reference" / "cli.html").read_text()
  for name in ("two_moons", "mnist_pigeon", "mnist_cnn", "mc_dropout", "pixel_regression"):
    assert f"usage: python -m experiments.{name}" in cli
  # The API pages are generated from the docstrings: every exported name has its entry.
  api = (site / "reference" / "api" / "jaxtrain.html").read_text()
  anchors = set(re.findall(r'id="([\w.]+)"', api))
  names = [n for n in jaxtrain.__all__ if not isinstance(getattr(jaxtrain, n), types.ModuleType)]
  assert not [n for n in names if not any(a.endswith(f".{n}") for a in anchors)]
  for page in (site / "reference" / "api").glob("*.html"):
    assert page.name == "index.html" or 'class="doc doc-contents' in page.read_text(), page.name


def _public_modules() -> dict[str, types.ModuleType]:
  """``jaxtrain`` and the submodules it exports by short name."""
  modules = {"jaxtrain": jaxtrain}
  for target in jaxtrain._SUBMODULES.values():
    modules[target] = importlib.import_module(target)
  for extra in ("jaxtrain.nn.nnx_models", "jaxtrain.engine.distributed"):
    modules[extra] = importlib.import_module(extra)
  return modules


def _public_names(module: types.ModuleType) -> list[str]:
  if hasattr(module, "__all__"):
    return list(module.__all__)
  return [name for name, value in vars(module).items()
          if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
          and (inspect.isfunction(value) or inspect.isclass(value))]


def _has_docstring(value) -> bool:
  if inspect.isclass(value):
    doc = value.__dict__.get("__doc__") or ""
    return bool(doc.strip()) and not doc.startswith(f"{value.__name__}(")  # not dataclass's
  return bool((getattr(value, "__doc__", None) or "").strip())


def test_every_public_name_has_a_docstring():
  missing = []
  for module_name, module in _public_modules().items():
    if not _has_docstring(module):
      missing.append(module_name)
    for name in _public_names(module):
      value = getattr(module, name)
      if isinstance(value, types.ModuleType) or not callable(value):
        continue
      if not _has_docstring(value):
        missing.append(f"{module_name}.{name}")
      if inspect.isclass(value):
        for attr, member in vars(value).items():
          function = getattr(member, "__func__", member)
          function = function.fget if isinstance(function, property) else function
          if not attr.startswith("_") and inspect.isfunction(function) and \
              not _has_docstring(function):
            missing.append(f"{module_name}.{name}.{attr}")
  assert not missing, f"public names without a docstring: {sorted(set(missing))}"


def test_every_public_module_has_an_api_page():
  api = DOCS / "reference" / "api"
  pages = "".join(p.read_text() for p in api.glob("*.md"))
  shown = set(re.findall(r"^::: ([\w.]+)$", pages, flags=re.MULTILINE))
  assert set(_public_modules()) <= shown, sorted(set(_public_modules()) - shown)
  for short in jaxtrain._SUBMODULES:
    assert (api / f"{short}.md").exists() or short == "datasets", short


def test_the_top_level_page_shows_every_exported_name():
  page = (DOCS / "reference" / "api" / "jaxtrain.md").read_text()
  listed = set(re.findall(r"^\s+- (\w+)$", page, flags=re.MULTILINE))  # `members:` of `::: jaxtrain`
  listed |= {path.rpartition(".")[2] for path in re.findall(r"^::: ([\w.]+)$", page, flags=re.MULTILINE)}
  listed.discard("jaxtrain")
  functions = {n for n in jaxtrain.__all__
               if not isinstance(getattr(jaxtrain, n), types.ModuleType)}
  assert functions == listed, (sorted(functions - listed), sorted(listed - functions))

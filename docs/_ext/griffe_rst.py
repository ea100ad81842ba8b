"""A griffe extension: jaxtrain's docstrings, written for ``help()`` and
doctest, rendered as Markdown by mkdocstrings.

* Sphinx roles (``:func:`~jaxtrain.fit```, ``:class:`TrainState```) become
  cross-references to the object they name, resolved in the docstring's scope;
  one that names nothing on the site is plain code (an optional reference).
* A doctest becomes a fenced ``pycon`` block (Markdown would read its ``>>>``
  as quotes, and its output as links).
* A reStructuredText literal-block marker ``::`` at the end of a line becomes
  ``:`` (the indented block after it is already code in Markdown).

The docstrings themselves stay as they are: this runs when the site is built.
"""

from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:mod|class|func|meth|attr|data|obj|exc|const):`(~?)([^`]+)`")


def _target(obj: griffe.Object, name: str) -> str:
  """The full path ``name`` means in ``obj``'s scope (itself if unresolvable)."""
  name = name.strip().removesuffix("()")
  scopes = [obj] + list(_parents(obj))
  for scope in scopes:
    try:
      return scope.resolve(name.split(".")[0]) + name[len(name.split(".")[0]):]
    except (griffe.NameResolutionError, ValueError, KeyError, AttributeError):
      continue
  return name


def _parents(obj: griffe.Object):
  while obj.parent is not None:
    obj = obj.parent
    yield obj


def _roles(obj: griffe.Object, text: str) -> str:
  def replace(match: re.Match) -> str:
    short, name = match.groups()
    title = name.strip().split(".")[-1] if short else name.strip()
    identifier = _target(obj, name)
    return (f'<autoref identifier="{html.escape(identifier)}" optional>'
            f"<code>{html.escape(title)}</code></autoref>")
  return ROLE.sub(replace, text)


def _doctests(text: str) -> str:
  """Fences every doctest (a ``>>>`` line and the lines after it up to a blank one)."""
  out, lines, i = [], text.splitlines(), 0
  while i < len(lines):
    line = lines[i]
    if line.lstrip().startswith(">>>"):
      indent = line[:len(line) - len(line.lstrip())]
      block = []
      while i < len(lines) and lines[i].strip():
        block.append(lines[i])
        i += 1
      out += [indent + "```pycon", *block, indent + "```"]
      continue
    out.append(re.sub(r"(\S)::$", r"\1:", line))
    i += 1
  return "\n".join(out)


class RstToMarkdown(griffe.Extension):
  """Rewrites every docstring of the loaded package once it is complete."""

  def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
    seen = set()

    def visit(obj):
      if id(obj) in seen or obj.is_alias:
        return
      seen.add(id(obj))
      if obj.docstring is not None:
        obj.docstring.value = _doctests(_roles(obj, obj.docstring.value))
      for member in obj.members.values():
        if not member.is_alias:
          visit(member)

    visit(pkg)

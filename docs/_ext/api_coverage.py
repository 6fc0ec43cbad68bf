"""The API reference, written from the public names, and the check that it covers them.

Before reading the sources (``builder-inited``) this extension writes ``api/*.md``: one page
per public module, each public function, class and constant documented once, on the page of
the first namespace that exports it (``bilevel_jax`` first, so ``bj.sama`` is documented as
``bilevel_jax.sama``; the submodule pages link to it). After reading (``env-check-consistency``)
it fails the build, naming each problem, when a public module cannot be imported or lacks
``__all__``, a public function or class has no docstring of its own, or a public name has no
entry in the built reference (e.g. autodoc could not import it).
"""

from __future__ import annotations

import inspect
import pathlib
from collections.abc import Iterable

from sphinx.errors import ExtensionError

from bilevel_jax import _public

API_DIR = "api"


def _kind(obj) -> str:
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    return "function" if inspect.isroutine(obj) else "data"


def _directive(name: _public.PublicName) -> str:
    kind = _kind(name.obj)
    head = f".. auto{kind}:: {name.qualified}"
    if kind == "class" and not (issubclass(name.obj, tuple) and hasattr(name.obj, "_fields")):
        return head + "\n   :members:\n"  # methods and properties; a NamedTuple's fields are
    return head + "\n"  # described in its docstring


def homes(names: Iterable[_public.PublicName]) -> dict[int, _public.PublicName]:
    """Each object's documented name: the first public name that exports it."""
    out: dict[int, _public.PublicName] = {}
    for n in names:
        out.setdefault(id(n.obj), n)
    return out


def pages(names: list[_public.PublicName]) -> dict[str, str]:
    """``{file name: MyST text}`` of the API reference."""
    home = homes(names)
    modules = list(dict.fromkeys(n.module for n in names))
    qualified = {n.qualified for n in names}
    out = {}
    for module in modules:
        here = [n for n in names if n.module == module]
        own = [n for n in here if home[id(n.obj)] is n]
        elsewhere = [home[id(n.obj)] for n in here if home[id(n.obj)] is not n]
        lines = [
            f"# `{module}`",
            "",
            "```{eval-rst}",
            f".. automodule:: {module}",
            "   :no-members:",
        ]
        if module in qualified:  # e.g. the module bilevel_jax.fit and the function bj.fit
            lines.append("   :no-index:")
        lines += ["```", ""]
        if elsewhere:
            refs = ", ".join(f"{{py:obj}}`~{n.qualified}`" for n in elsewhere)
            lines += [f"Also exported here (documented where first exported): {refs}.", ""]
        if own:
            lines += ["```{eval-rst}"] + [_directive(n) for n in own] + ["```", ""]
        out[f"{module}.md"] = "\n".join(lines)
    toc = "\n".join(f"{m}" for m in modules)
    out["index.md"] = (
        "# API reference\n\n"
        "Every public name of `bilevel_jax`: the top-level namespace (`import bilevel_jax as bj`)"
        " and each public submodule. Every function and class carries an example; all of them"
        " run as doctests in the test suite.\n\n"
        f"```{{toctree}}\n:maxdepth: 1\n\n{toc}\n```\n"
    )
    return out


def missing_from_reference(names: Iterable[_public.PublicName], documented: set[str]) -> list[str]:
    """The public objects none of whose public names is in ``documented`` (one name each)."""
    by_obj: dict[int, list[_public.PublicName]] = {}
    for n in names:
        by_obj.setdefault(id(n.obj), []).append(n)
    return [
        ns[0].qualified for ns in by_obj.values() if not any(n.qualified in documented for n in ns)
    ]


def _write_pages(app) -> None:
    names, _ = _public.public_names()
    out = pathlib.Path(app.srcdir) / API_DIR
    out.mkdir(exist_ok=True)
    wanted = pages(names)
    for old in out.glob("*.md"):
        if old.name not in wanted:
            old.unlink()
    for fname, text in wanted.items():
        path = out / fname
        if not path.exists() or path.read_text() != text:  # unchanged pages stay cached
            path.write_text(text)


def _check(app, env) -> None:
    names, problems = _public.public_names()
    problems = list(problems)
    problems += [f"{q} (no docstring)" for q in _public.undocumented(names)]
    documented = set(env.get_domain("py").objects)
    problems += [
        f"{q} (not in the API reference)" for q in missing_from_reference(names, documented)
    ]
    if problems:
        raise ExtensionError(
            f"API coverage: {len(problems)} public name(s) undocumented:\n  "
            + "\n  ".join(problems)
        )


def setup(app):
    app.connect("builder-inited", _write_pages)
    app.connect("env-check-consistency", _check)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

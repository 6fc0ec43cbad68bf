"""What is public: the one list the docstring tests and the docs' API coverage check read.

The public names are ``bilevel_jax.__all__`` and the ``__all__`` of each module in
:data:`PUBLIC_MODULES`. :func:`public_names` walks them; :func:`undocumented` names the
functions and classes among them whose own docstring is empty (or has no ``>>>`` example,
when asked), so a name that loses its docstring fails both the test suite and the docs build.

Example:
  >>> from bilevel_jax import _public
  >>> names, problems = _public.public_names()
  >>> problems, "bilevel_jax.sama" in {n.qualified for n in names}
  ([], True)
  >>> _public.undocumented(names)
  []
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

# The public submodules, in the order the API reference lists them.
PUBLIC_MODULES = (
    "hypergrad",
    "loop",
    "fit",
    "base_step",
    "transform",
    "adaptation",
    "implicit_diff",
    "linalg",
    "selection",
    "influence",
    "multilevel",
    "parallel",
    "distributed",
    "checkpoint",
    "nnx",
)


class PublicName(NamedTuple):
    """One public name: ``qualified`` (``module.attr``), its ``module`` and the ``obj``."""

    qualified: str
    module: str
    obj: Any


def documentable(obj: Any) -> bool:
    """Functions and classes carry their own docstring; constants and modules do not."""
    return inspect.isclass(obj) or inspect.isroutine(obj)


def own_doc(obj: Any) -> str:
    """The object's own docstring (a class without one does not inherit its base's)."""
    return (obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)) or ""


def public_names(
    modules: Sequence[str] = PUBLIC_MODULES, *, package: str = "bilevel_jax"
) -> tuple[list[PublicName], list[str]]:
    """``(names, problems)``: every public name of ``package`` and ``package.<module>`` for
    each of ``modules`` (submodules listed in ``__all__`` excluded), in ``__all__`` order; and
    the modules that cannot be imported or declare no ``__all__``, and the names listed in an
    ``__all__`` but missing."""
    namespaces, problems = [package], []
    namespaces += [f"{package}.{m}" for m in modules]
    names: list[PublicName] = []
    for prefix in namespaces:
        try:
            module = importlib.import_module(prefix)
        except ImportError as e:
            problems.append(f"{prefix} (cannot be imported: {e})")
            continue
        exported = getattr(module, "__all__", None)
        if exported is None:
            problems.append(f"{prefix} (no __all__)")
            continue
        for attr in exported:
            if not hasattr(module, attr):
                problems.append(f"{prefix}.{attr} (listed in __all__ but missing)")
                continue
            obj = getattr(module, attr)
            if not inspect.ismodule(obj):
                names.append(PublicName(f"{prefix}.{attr}", prefix, obj))
    return names, problems


def undocumented(names: Iterable[PublicName], *, example: bool = False) -> list[str]:
    """The qualified names of the functions and classes in ``names`` whose own docstring is
    empty, or (``example=True``) has no ``>>>`` example; each object is judged once."""
    seen, missing = set(), []
    for n in names:
        if not documentable(n.obj) or id(n.obj) in seen:
            continue
        seen.add(id(n.obj))
        doc = own_doc(n.obj).strip()
        if not doc or (example and ">>>" not in doc):
            missing.append(n.qualified)
    return missing

"""Every public name of ``bilevel_jax`` has a docstring with a runnable ``>>>`` example.

The public names are ``bilevel_jax.__all__`` and the ``__all__`` of each public submodule. The
examples themselves run as doctests (``--doctest-modules`` over ``bilevel_jax/``, configured in
``pyproject.toml``); this test makes sure none is missing.
"""

import importlib
import inspect

import bilevel_jax

PUBLIC_MODULES = (
    "hypergrad",
    "linalg",
    "selection",
    "influence",
    "multilevel",
    "adaptation",
    "implicit_diff",
    "parallel",
    "distributed",
    "checkpoint",
    "nnx",
    "fit",
    "transform",
    "loop",
    "base_step",
)


def _documentable(obj) -> bool:
    """Functions and classes carry their own docstring; constants and modules do not."""
    return inspect.isclass(obj) or inspect.isroutine(obj)


def _own_doc(obj) -> str:
    """The object's own docstring (a class without one does not inherit its base's)."""
    return (obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)) or ""


def _public_names():
    """``(qualified name, object)`` for every public name, each object once."""
    namespaces = [("bilevel_jax", bilevel_jax)]
    problems = []
    for name in PUBLIC_MODULES:
        try:
            namespaces.append(
                (f"bilevel_jax.{name}", importlib.import_module(f"bilevel_jax.{name}"))
            )
        except ImportError as e:
            problems.append(f"bilevel_jax.{name} (cannot be imported: {e})")
    seen, names = set(), []
    for prefix, module in namespaces:
        exported = getattr(module, "__all__", None)
        if exported is None:
            problems.append(f"{prefix} (no __all__)")
            continue
        for attr in exported:
            obj = getattr(module, attr, None)
            if obj is None:
                problems.append(f"{prefix}.{attr} (listed in __all__ but missing)")
                continue
            if inspect.ismodule(obj) or not _documentable(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            names.append((f"{prefix}.{attr}", obj))
    return names, problems


def test_public_modules_are_importable_and_declare_all():
    _, problems = _public_names()
    assert not problems, "\n".join(problems)


def test_every_public_name_has_a_docstring_with_an_example():
    names, _ = _public_names()
    assert len(names) > 30  # the walk found the API
    missing = [qualified for qualified, obj in names if ">>>" not in _own_doc(obj)]
    assert not missing, (
        f"{len(missing)} of {len(names)} public names have no `>>>` example in their docstring:\n  "
        + "\n  ".join(sorted(missing))
    )

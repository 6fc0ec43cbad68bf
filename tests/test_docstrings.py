"""Every public name of ``bilevel_jax`` has a docstring with a runnable ``>>>`` example.

The public names are ``bilevel_jax.__all__`` and the ``__all__`` of each public submodule
(``bilevel_jax._public``, the list the docs' API coverage check reads too). The examples
themselves run as doctests (``--doctest-modules`` over ``bilevel_jax/``, configured in
``pyproject.toml``); this test makes sure none is missing.
"""

import sys
import types
from typing import Any

from bilevel_jax import _public


def test_public_modules_are_importable_and_declare_all():
    _, problems = _public.public_names()
    assert not problems, "\n".join(problems)


def test_every_public_name_has_a_docstring_with_an_example():
    names, _ = _public.public_names()
    assert len({id(n.obj) for n in names if _public.documentable(n.obj)}) > 30  # found the API
    missing = _public.undocumented(names, example=True)
    assert not missing, (
        f"{len(missing)} public names have no `>>>` example in their docstring:\n  "
        + "\n  ".join(sorted(missing))
    )


def test_the_walk_reports_what_is_missing(monkeypatch):
    """The check can fail: a module with an undocumented function, one without an example, a
    class inheriting its only docstring, a name in ``__all__`` that is not there, and a
    submodule that does not declare ``__all__``."""
    pkg: Any = types.ModuleType("fakepkg")
    sub: Any = types.ModuleType("fakepkg.sub")

    def bare(x):
        return x

    def no_example(x):
        """Documented, without an example."""
        return x

    def good(x):
        """Documented.

        >>> good(1)
        1
        """
        return x

    class Base:
        """A base class.

        >>> Base()
        <...>
        """

    class Child(Base):
        pass

    pkg.__all__ = ["bare", "good", "Child", "gone", "sub"]
    pkg.bare, pkg.good, pkg.Child, pkg.sub = bare, good, Child, sub
    sub.no_example, sub.good = no_example, good  # good seen twice: judged once
    empty = types.ModuleType("fakepkg.empty")
    for name, mod in [("fakepkg", pkg), ("fakepkg.sub", sub), ("fakepkg.empty", empty)]:
        monkeypatch.setitem(sys.modules, name, mod)
    sub.__all__ = ["no_example", "good"]
    names, problems = _public.public_names(("sub", "empty"), package="fakepkg")
    assert problems == [
        "fakepkg.gone (listed in __all__ but missing)",
        "fakepkg.empty (no __all__)",
    ]
    assert [n.qualified for n in names] == [
        "fakepkg.bare",
        "fakepkg.good",
        "fakepkg.Child",
        "fakepkg.sub.no_example",
        "fakepkg.sub.good",
    ]
    assert _public.undocumented(names) == ["fakepkg.bare", "fakepkg.Child"]
    assert _public.undocumented(names, example=True) == [
        "fakepkg.bare",
        "fakepkg.Child",
        "fakepkg.sub.no_example",
    ]

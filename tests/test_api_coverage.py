"""The docs' API reference covers every public name, and its check fails when one is not.

``docs/_ext/api_coverage.py`` writes the reference pages from ``bilevel_jax._public`` and fails
the Sphinx build (``env-check-consistency``) on an undocumented or unrendered public name."""

import pathlib
import sys
import types

import pytest

pytest.importorskip("sphinx")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "docs" / "_ext"))

import api_coverage  # noqa: E402
from sphinx.errors import ExtensionError  # noqa: E402

from bilevel_jax import _public  # noqa: E402


def test_pages_document_every_public_object_once_where_first_exported():
    names, problems = _public.public_names()
    assert not problems
    text = "\n".join(api_coverage.pages(names).values())
    objects = [
        line.split("::")[1].strip()
        for line in text.splitlines()
        if line.startswith(".. auto") and not line.startswith(".. automodule::")
    ]
    assert len(objects) == len(set(objects))  # each documented once
    home = api_coverage.homes(names)
    assert sorted(objects) == sorted(n.qualified for n in home.values())
    assert "bilevel_jax.sama" in objects and "bilevel_jax.hypergrad.sama" not in objects
    assert "bilevel_jax.hypergrad.Implicit" in objects  # exported by the submodule only
    assert api_coverage.missing_from_reference(names, set(objects)) == []


def _env(documented):
    return types.SimpleNamespace(
        get_domain=lambda name: types.SimpleNamespace(objects=dict.fromkeys(documented))
    )


def test_the_check_fails_on_a_name_missing_from_the_reference():
    names, _ = _public.public_names()
    documented = {n.qualified for n in api_coverage.homes(names).values()}
    api_coverage._check(None, _env(documented))  # complete: passes
    with pytest.raises(ExtensionError, match=r"bilevel_jax\.sama \(not in the API reference\)"):
        api_coverage._check(None, _env(documented - {"bilevel_jax.sama"}))


def test_the_check_fails_when_a_public_name_loses_its_docstring(monkeypatch):
    names, _ = _public.public_names()
    documented = {n.qualified for n in api_coverage.homes(names).values()}
    import bilevel_jax.linalg as linalg

    monkeypatch.setattr(linalg.solve_cg, "__doc__", None)
    with pytest.raises(ExtensionError, match=r"bilevel_jax\.linalg\.solve_cg \(no docstring\)"):
        api_coverage._check(None, _env(documented))

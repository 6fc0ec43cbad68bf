"""The package as a user gets it: a wheel built from the sources, installed into a fresh virtual
environment outside the repository with only its runtime dependencies, runs the README's first
example there."""

import email.parser
import os
import pathlib
import re
import shutil
import subprocess
import sys
import venv
import zipfile

import pytest

import bilevel_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "requirements.lock")
README = pathlib.Path(ROOT, "README.md").read_text(encoding="utf-8")
_first = re.search(r"<!-- first-example-start -->\n```python\n(.*?)```", README, re.S)
assert _first is not None, "README.md lost its first-example markers"
FIRST_EXAMPLE = _first.group(1)
# what pip prints when the package registry cannot be reached (then the install is skipped)
OFFLINE = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel from a copy of the sources (nothing is written into the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(ROOT, name), src / name)
    shutil.copytree(
        os.path.join(ROOT, "bilevel_jax"),
        src / "bilevel_jax",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=600,  # seconds in an idle run; headroom for a loaded 2-core machine
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (path,) = dist.glob("*.whl")
    return path


def test_wheel_holds_the_package_its_version_and_the_runtime_dependencies(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    assert "bilevel_jax/py.typed" in names  # typed package (PEP 561)
    assert "bilevel_jax/multilevel/_step.py" in names and "bilevel_jax/influence/logra.py" in names
    assert not [n for n in names if n.startswith(("tests/", "experiments/", "docs/", "notebooks/"))]
    assert meta["Name"] == "bilevel-jax"
    assert meta["Version"] == bilevel_jax.__version__  # one source for the version
    requires = meta.get_all("Requires-Dist") or []
    runtime = sorted(re.split(r"[<>=!~ ;\[]", r)[0] for r in requires if "extra ==" not in r)
    assert runtime == ["chex", "jax", "jaxlib", "optax", "orbax-checkpoint"]
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"nnx", "docs", "test", "experiments"} <= extras
    assert any(r.startswith("flax") and 'extra == "nnx"' in r for r in requires)


def test_wheel_installs_into_a_fresh_venv_and_runs_the_readme_example(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # The runtime dependencies come from the package registry, at the versions of the lock.
    r = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "-c",
            LOCK,
            str(wheel),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=1200,  # ~40 s on the 2-core machine; downloads can be slow
    )
    if r.returncode != 0 and any(s in r.stderr for s in OFFLINE):
        pytest.skip(f"the package registry cannot be reached: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    run.mkdir()  # outside the repository, so the checkout cannot be imported by accident
    check = (
        "import importlib.util, bilevel_jax\n"
        "print(bilevel_jax.__file__)\n"
        "print(importlib.util.find_spec('flax') is None)\n"
    )
    r = subprocess.run(
        [python, "-c", check], capture_output=True, text=True, env=env, cwd=run, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    where, no_flax = r.stdout.split()
    assert where.startswith(str(env_dir)), where  # the installed copy, not the checkout
    assert no_flax == "True"  # only the runtime dependencies were installed
    r = subprocess.run(
        [python, "-c", FIRST_EXAMPLE],
        capture_output=True,
        text=True,
        env=env,
        cwd=run,
        timeout=600,  # ~15 s idle
    )
    assert r.returncode == 0, r.stderr[-3000:]
    printed = r.stdout.strip()
    assert re.fullmatch(
        r"mean weight of clean examples \d\.\d\d, of flipped ones \d\.\d\d", printed
    )
    assert f"This prints `{printed}`" in README  # the same numbers as in the checkout

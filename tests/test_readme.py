"""Every python block of the README and the docs runs against the current API (and the examples
learn): the README's and the user guide's blocks by the tests below (they share one namespace in
order), every other docs page's blocks as whole programs whose output the page shows."""

import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"
BLOCKS = [
    block
    for page in (README, GUIDE)
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
]

# Each python block is identified by a line it contains; every block must be one of these.
MARKERS = {
    "usage": "mean weight of clean examples",
    "implicit": "@bj.custom_root(",
    "loop": "state, history = bj.fit(",
    "mwn": "def mwn(lam, loss):",
    "selection": "selection = bj.Selection(",
    "data_parallel": "from jax.sharding import Mesh",
    "multihost": "dist.initialize()",
}


def _block(name: str) -> str:
    (block,) = [b for b in BLOCKS if MARKERS[name] in b]
    return block


def _run(name: str, ns: dict) -> dict:
    exec(compile(_block(name), f"README.md ({name} block)", "exec"), ns)  # noqa: S102 - our README
    return ns


def test_every_python_block_is_run_by_a_test():
    assert BLOCKS, "README has no python example"
    names = [[n for n, m in MARKERS.items() if m in b] for b in BLOCKS]
    unknown = [b[:80] for b, n in zip(BLOCKS, names) if len(n) != 1]
    assert not unknown, f"README python blocks that no test runs (or ambiguous): {unknown}"
    assert sorted(n for (n,) in names) == sorted(MARKERS)


def test_readme_usage_example_runs(capsys):
    """The README's first example: the flipped labels end up weighted far below the clean ones."""
    ns = _run("usage", {})
    w, flipped = jax.nn.sigmoid(ns["lam"]["logit"]), ns["flipped"]
    clean_mean, flipped_mean = float(w[~flipped].mean()), float(w[flipped].mean())
    assert clean_mean > 0.5 > 0.1 > flipped_mean, (clean_mean, flipped_mean)
    # what it prints is what the README says it prints
    printed = capsys.readouterr().out.strip()
    assert (
        printed
        == f"mean weight of clean examples {clean_mean:.2f}, of flipped ones {flipped_mean:.2f}"
    )
    assert f"This prints `{printed}`" in README.read_text()
    assert int(ns["meta_state"][0].count) == 300 and int(ns["meta_state"][0].nonfinite_count) == 0


def test_readme_selection_example_learns_to_drop_dirty_examples(capsys):
    ns = _run("selection", {})
    # oracle: the scorer starts flat (λ = 0: ties keep the first 64, half of them dirty) and
    # must end up ranking the clean examples (targets of the right sign) first
    assert int(ns["dirty"][ns["kept"]].sum()) <= 4
    assert "of the 64 top-scored examples are dirty" in capsys.readouterr().out
    assert int(ns["state"].skipped_meta) == 0 and int(ns["state"].meta_steps) == 300


def test_readme_implicit_diff_example_matches_closed_form():
    ns = _run("implicit", {})
    x, y = ns["x"], ns["y"]

    def closed(lam):
        theta = jnp.linalg.solve(x.T @ x + lam * jnp.eye(3), x.T @ y)
        return jnp.sum(theta**2)

    got = float(jax.grad(ns["val"])(1.0))
    assert abs(got - float(jax.grad(closed)(1.0))) < 1e-3 * abs(got)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The training-loop block, run in a scratch directory (it writes loop.jsonl)."""
    cwd = pathlib.Path.cwd()
    out = tmp_path_factory.mktemp("readme")
    os.chdir(out)
    try:
        ns = _run("loop", {})
    finally:
        os.chdir(cwd)
    ns["_dir"] = out
    return ns


def test_readme_training_loop_learns_and_logs(trained):
    state, history = trained["state"], trained["history"]
    assert int(state.meta_steps) == 200 and int(state.base_steps) == 1000
    accs = [r["eval"]["acc"] for r in history if "eval" in r]
    assert len(accs) == 4 and accs[-1] > 0.85, accs  # 10 classes: chance is 0.1
    assert (trained["_dir"] / "loop.jsonl").read_text().count("\n") >= 200
    flipped = np.asarray(trained["noisy"] != trained["y"])[trained["train"]]
    w = np.asarray(jax.nn.sigmoid(state.meta_params[trained["train"]]))
    assert w[flipped].mean() < w[~flipped].mean() - 0.1  # the noisy labels are down-weighted


def test_readme_meta_weight_net_recipe_learns(trained):
    """The Meta-Weight-Net block (Σwℓ/Σw, zero output layer, α = 0.1) on the loop block's data."""
    ns = _run("mwn", dict(trained))
    state, history = ns["mwn_state"], ns["mwn_history"]
    assert int(state.meta_steps) == 200 and int(state.skipped_meta) == 0
    accs = [r["eval"]["acc"] for r in history if "eval" in r]
    assert len(accs) == 4 and accs[-1] > 0.5, accs  # 10 classes: chance is 0.1
    assert float(jnp.max(jnp.abs(state.meta_params["w2"]))) > 0  # the MWN left its flat start


def test_readme_data_parallel_and_multihost_blocks_run(trained, monkeypatch):
    from bilevel_jax import distributed

    ns = dict(trained)
    ns = _run("data_parallel", ns)
    assert int(ns["state"].meta_steps) == 201
    # One process here: the multi-host block runs unchanged except that there is no cluster to
    # join, so initialize() is a no-op (tests/test_multihost.py covers the real 2-process case).
    monkeypatch.setattr(distributed, "initialize", lambda *a, **k: None)
    ns["state"] = trained["state"]
    ns = _run("multihost", ns)
    assert int(ns["state"].meta_steps) == 10  # a fresh start, 10 meta steps
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(ns["state"].base_params))


def test_checkpointer_as_written_works_in_a_clean_interpreter(tmp_path):
    """The README (and fit's docs) write ``bj.checkpoint.Checkpointer(dir)`` after a bare
    ``import bilevel_jax as bj``; the module is imported lazily, so orbax is not loaded before."""
    code = (
        "import sys, bilevel_jax as bj\n"
        "assert 'orbax.checkpoint' not in sys.modules, 'import bilevel_jax loaded orbax'\n"
        f"bj.checkpoint.Checkpointer({str(tmp_path)!r}).close()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# each python block, and the ```text block right after it (the output it shows), if any
_BLOCK = re.compile(r"```python\n(.*?)```\n(?:\s*```text\n(.*?)```)?", re.S)
DOC_BLOCKS = [
    (str(page.relative_to(ROOT / "docs")), i, m.group(1), m.group(2))
    for page in sorted((ROOT / "docs").rglob("*.md"))
    # not the pages the docs build generates (api/: from the docstrings, whose examples run as
    # doctests; it may be writing them while the suite collects, scripts/test.sh)
    if page != GUIDE
    and not {"_build", "api", "jupyter_execute"} & set(page.relative_to(ROOT / "docs").parts)
    for i, m in enumerate(_BLOCK.finditer(page.read_text()))
]
# A block that sets environment variables (XLA flags, fake devices) before JAX starts needs a
# process of its own; a page's other blocks share one (tests/_doc_blocks.py: a fresh namespace
# each, 64-bit mode reset after each), which saves an interpreter and JAX start per block.
_OWN_PROCESS = ("os.environ", "XLA_FLAGS", "jax.distributed")


def _group(page: str, i: int) -> tuple:
    block = next(b for p, j, b, _ in DOC_BLOCKS if (p, j) == (page, i))
    return (page, i) if any(k in block for k in _OWN_PROCESS) else (page,)


@functools.cache
def _run_group(group: tuple) -> dict[int, dict]:
    """Run the blocks of ``group`` (a page, or one block of it) in one fresh process."""
    ids, blocks = zip(*[(j, b) for p, j, b, _ in DOC_BLOCKS if _group(p, j) == group], strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec = pathlib.Path(tmp) / "blocks.json"
        spec.write_text(json.dumps(list(blocks)))
        r = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "_doc_blocks.py"), str(spec)],
            capture_output=True,
            text=True,
            timeout=600,  # a whole page's blocks; the slowest page takes ~30 s on 2 loaded cores
        )
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(zip(ids, json.loads(r.stdout.splitlines()[-1]), strict=True))


@pytest.mark.parametrize(
    "page, i, block, shown", DOC_BLOCKS, ids=[f"{p}-{i}" for p, i, _, _ in DOC_BLOCKS]
)
def test_docs_python_blocks_run_and_print_what_the_page_says(page, i, block, shown):
    """Each python block of docs/ is a whole program. What it prints must be the ```text block
    right after it, where there is one; otherwise every line it prints must appear on its
    page."""
    result = _run_group(_group(page, i))[i]
    assert result["error"] is None, f"{page} block {i} raised:\n{result['error'][-2000:]}"
    text = (ROOT / "docs" / page).read_text()
    printed = [line.strip() for line in result["stdout"].splitlines() if line.strip()]
    assert printed, "the block prints nothing to check"
    if shown is not None:
        want = [line.strip() for line in shown.splitlines() if line.strip()]
        assert printed == want, f"{page} block {i} printed {printed}, the page shows {want}"
        return
    missing = [line for line in printed if line not in text]
    assert not missing, f"{page} block {i} printed lines its page does not show: {missing}"


def test_a_docs_block_that_raises_is_reported_and_the_next_starts_clean():
    """The shared-process runner: a raising block's traceback comes back, and the next block
    sees neither its names nor its 64-bit mode."""
    from tests import _doc_blocks

    first = (
        "import jax\njax.config.update('jax_enable_x64', True)\nleft = 1\nraise ValueError('no')"
    )
    second = "import jax.numpy as jnp\nprint(jnp.ones(1).dtype, 'left' in globals())"
    bad, good = _doc_blocks.run([first, second])
    assert "ValueError: no" in bad["error"]
    assert good == {"stdout": "float32 False\n", "error": None}

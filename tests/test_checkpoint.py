"""bilevel_jax.checkpoint: bit-exact round trips, keep-last-N, corruption fallback, SIGKILL resume."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel_jax.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointFallbackWarning,
    CheckpointStructureError,
)
from tests import _xla

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_ckpt_worker.py"


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    step: jax.Array
    meta_step: jax.Array
    key: jax.Array  # uint32 PRNGKey
    typed_key: jax.Array  # jax.random.key


def _state(seed: int) -> TrainState:
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {
        "dense": {"w": jax.random.normal(k[0], (64, 32)), "b": jax.random.normal(k[1], (32,))},
        "emb": jax.random.normal(k[2], (16, 8)).astype(jnp.bfloat16),
    }
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero mu/nu, count=1
    return TrainState(
        params, opt_state, jnp.int32(100 + seed), jnp.int32(seed), k[3], jax.random.key(seed)
    )


def _template() -> TrainState:
    def zero(x):
        return (
            jax.random.key(0) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.zeros_like(x)
        )

    return jax.tree.map(zero, _state(0))


def _raw(x) -> tuple:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return (str(x.dtype), x.shape, np.asarray(jax.random.key_data(x)).tobytes())
    return (str(x.dtype), x.shape, np.asarray(x).tobytes())


def assert_bit_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert _raw(x) == _raw(y), jax.tree_util.keystr(path)


def _fill(tmp_path, steps=(10, 20, 30), max_to_keep=3) -> Checkpointer:
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=max_to_keep)
    for s in steps:
        ckpt.save(s, _state(s), extra={"data_position": s * 32, "rng_seed": 0})
    return ckpt


def _data_files(step_dir: Path) -> list[Path]:
    files = [Path(f) for f in glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)]
    assert files, f"no OCDBT data files under {step_dir}"
    return files


# ----------------------------------------------------------------------------- round trip
def test_round_trip_bit_identical(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    state = _state(3)
    extra = {
        "data_position": 1234,
        "rng_seed": 0,
        "note": "x",
        "nested": {"lr": 1e-3, "ids": [1, 2]},
    }
    ckpt.save(7, state, extra=extra)
    assert ckpt.all_steps() == [7] and ckpt.latest_step() == 7

    step, restored, extra_back = ckpt.restore(_template())
    assert step == 7 and extra_back == extra
    assert isinstance(restored, TrainState)
    assert restored.params["emb"].dtype == jnp.bfloat16 and restored.step.dtype == jnp.int32
    assert restored.key.dtype == jnp.uint32
    assert jnp.issubdtype(restored.typed_key.dtype, jax.dtypes.prng_key)
    opt_state = cast(tuple, restored.opt_state)  # optax.chain state: (clip state, adam state)
    assert type(opt_state[0]).__name__ == "EmptyState"
    assert type(opt_state[1][0]).__name__ == "ScaleByAdamState"
    assert_bit_identical(restored, state)

    # An abstract template works too, and a fresh Checkpointer sees the same step.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    step2, restored2, _ = Checkpointer(tmp_path / "ckpt").restore(abstract, step=7)
    assert step2 == 7
    assert_bit_identical(restored2, state)


def test_save_is_committed_by_atomic_rename(tmp_path, monkeypatch):
    renames = []
    real_rename = os.rename

    def spy(src, dst, *a, **k):
        renames.append((os.fspath(src), os.fspath(dst)))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", spy)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(5, _state(5))
    final = str(tmp_path / "ckpt" / "5")
    assert any(dst == final and ".orbax-checkpoint-tmp" in src for src, dst in renames), renames
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["5"]


def test_stale_temporary_directory_is_ignored_and_removed(tmp_path):
    ckpt = _fill(tmp_path, steps=(10, 20))
    root = tmp_path / "ckpt"
    shutil.copytree(
        root / "20", root / "30.orbax-checkpoint-tmp"
    )  # a save killed before its rename
    assert ckpt.all_steps() == [10, 20]
    ckpt2 = Checkpointer(root)  # what a resumed run does: restore 20, train, save 30 again
    assert ckpt2.all_steps() == [10, 20]
    assert ckpt2.restore(_template()).step == 20
    ckpt2.save(30, _state(30))
    assert sorted(os.listdir(root)) == ["10", "20", "30"]  # the stale tmp directory is gone
    assert_bit_identical(ckpt2.restore(_template()).state, _state(30))


# ----------------------------------------------------------------------------- keep last N
def test_keeps_only_last_n(tmp_path):
    ckpt = _fill(tmp_path, steps=(1, 2, 3, 4, 5), max_to_keep=2)
    assert ckpt.all_steps() == [4, 5]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["4", "5"]
    step, state, extra = ckpt.restore(_template())
    assert step == 5 and extra["data_position"] == 160
    assert_bit_identical(state, _state(5))


# ----------------------------------------------------------------------------- corruption
# orbax may leave an "Event loop is closed" error in a helper thread after a failed read.
quiet_orbax = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@quiet_orbax
@pytest.mark.parametrize(
    "damage", ["truncate_data", "flip_data_bit", "delete_metadata", "garble_metadata"]
)
def test_corrupt_latest_falls_back(tmp_path, damage):
    ckpt = _fill(tmp_path)
    latest = tmp_path / "ckpt" / "30"
    if damage == "truncate_data":
        for f in _data_files(latest):
            os.truncate(f, f.stat().st_size // 2)
    elif damage == "flip_data_bit":  # silent: only the checksum can notice
        biggest = max(_data_files(latest), key=lambda f: f.stat().st_size)
        b = bytearray(biggest.read_bytes())
        b[len(b) // 2] ^= 0x01
        biggest.write_bytes(bytes(b))
    elif damage == "delete_metadata":
        (latest / "meta" / "metadata").unlink()
    else:
        (latest / "meta" / "metadata").write_text('{"sha256": ')

    reason = {"truncate_data": "state unreadable", "flip_data_bit": "checksum mismatch"}
    reason = reason.get(damage, "metadata")
    with pytest.warns(CheckpointFallbackWarning) as record:
        step, state, extra = Checkpointer(tmp_path / "ckpt").restore(_template())
    assert step == 20 and extra == {"data_position": 640, "rng_seed": 0}
    messages = [str(w.message) for w in record]
    assert len(messages) == 2, messages
    assert "step 30" in messages[0] and reason in messages[0], messages
    assert "restored step 20 instead of the newest step 30" in messages[1], messages
    assert_bit_identical(state, _state(20))

    with pytest.raises(CheckpointCorruptError, match="step 30"):
        ckpt.restore(_template(), step=30)


@quiet_orbax
def test_all_corrupt_raises_listing_every_step(tmp_path):
    _fill(tmp_path)
    root = tmp_path / "ckpt"
    (root / "10" / "meta" / "metadata").unlink()
    for s in (20, 30):
        for f in _data_files(root / str(s)):
            f.write_bytes(b"\0" * f.stat().st_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointFallbackWarning)
        with pytest.raises(CheckpointCorruptError, match="no usable checkpoint") as err:
            Checkpointer(root).restore(_template())
    msg = str(err.value)
    for s in ("step 10:", "step 20:", "step 30:"):
        assert s in msg
    assert "metadata" in msg


def test_save_after_fallback_replaces_the_corrupt_step(tmp_path):
    _fill(tmp_path)
    (tmp_path / "ckpt" / "30" / "meta" / "metadata").unlink()
    ckpt = Checkpointer(tmp_path / "ckpt")
    with pytest.warns(CheckpointFallbackWarning):
        assert ckpt.restore(_template()).step == 20
    ckpt.save(30, _state(31), extra={"data_position": 1})  # the resumed run reaches step 30 again
    step, state, extra = ckpt.restore(_template())
    assert step == 30 and extra == {"data_position": 1}
    assert_bit_identical(state, _state(31))


# ----------------------------------------------------------------------------- misuse
def test_structure_mismatch_names_the_leaf(tmp_path):
    ckpt = _fill(tmp_path, steps=(1,))
    t = _template()
    bad_dtype = t._replace(step=jnp.float32(0))
    with pytest.raises(
        CheckpointStructureError, match=r"\.step: template float32\[\], checkpoint int32\[\]"
    ):
        ckpt.restore(bad_dtype)
    bad_shape = t._replace(params={**t.params, "emb": jnp.zeros((16, 9), jnp.bfloat16)})
    with pytest.raises(CheckpointStructureError, match=r"\['emb'\].*\[16, 9\].*\[16, 8\]"):
        ckpt.restore(bad_shape)
    missing = t._replace(params={k: v for k, v in t.params.items() if k != "emb"})
    with pytest.raises(CheckpointStructureError, match=r"not the template: .*\['emb'\]"):
        ckpt.restore(missing)


def test_misuse_errors(tmp_path):
    ckpt = _fill(tmp_path, steps=(10,))
    with pytest.raises(ValueError, match=r"step 10.*overwrite=True"):
        ckpt.save(10, _state(1))
    with pytest.raises(ValueError, match=r"step\(s\) \[10\]"):
        ckpt.save(5, _state(1))
    ckpt.save(5, _state(5), overwrite=True)  # rewind: step 10 is discarded
    assert ckpt.all_steps() == [5]
    with pytest.raises(TypeError, match="JSON-able"):
        ckpt.save(6, _state(1), extra={"pos": np.int64(3)})
    with pytest.raises(TypeError, match=r"\['count'\].*jnp.asarray"):
        ckpt.save(6, {"count": 3})
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 99"):
        ckpt.restore(_template(), step=99)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        Checkpointer(tmp_path / "empty").restore(_template())
    assert Checkpointer(tmp_path / "empty2").latest_step() is None


# ----------------------------------------------------------------------------- SIGKILL resume
def _run_worker(directory: Path, out: Path, **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = _xla.flags()  # the suite's compile flags, no fake devices
    env.update({k: str(v) for k, v in env_extra.items()})
    return subprocess.run(
        [sys.executable, str(WORKER), str(directory), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _lines(p: subprocess.CompletedProcess) -> list[str]:
    tags = {"FRESH", "RESUMED", "SAVED", "DONE"}
    return [ln for ln in p.stdout.splitlines() if ln.split()[:1] and ln.split()[0] in tags]


def test_sigkill_resume_is_bit_identical(tmp_path):
    ref = _run_worker(tmp_path / "ref", tmp_path / "ref.npz")
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert _lines(ref)[-1] == "DONE"

    d, out = tmp_path / "run", tmp_path / "run.npz"
    # 1) killed between checkpoints (at step 70, last save at 60).
    p = _run_worker(d, out, CKPT_KILL_AT=70)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert _lines(p) == ["FRESH", "SAVED 20", "SAVED 40", "SAVED 60"]
    # 2) resumes at 60 (data position 60 * 32); killed the instant save(140) returns.
    p = _run_worker(d, out, CKPT_KILL_AFTER_SAVE=140)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert _lines(p) == ["RESUMED 60 1920", "SAVED 80", "SAVED 100", "SAVED 120", "SAVED 140"]
    # 3) resumes at 140 and finishes.
    p = _run_worker(d, out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _lines(p) == ["RESUMED 140 4480", "SAVED 160", "SAVED 180", "SAVED 200", "DONE"]
    assert sorted(os.listdir(d)) == ["180", "200"]

    a, b = np.load(tmp_path / "ref.npz"), np.load(out)
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k

"""The projected-gradient store (bilevel_jax.influence.store) and block scoring (.scoring).

Oracles: a store written in one go (byte comparison with a killed-and-resumed one); numpy's /
ml_dtypes' casts for the low-precision round trip; float64 numpy dense linear algebra
(``Q (F + δI)⁻¹ Gᵀ`` with ``np.linalg.inv``, ``np.linalg.eigvalsh``) and ``np.argsort`` for the
scores, self-influence, damping and top-k.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from bilevel_jax.influence import scoring
from bilevel_jax.influence.store import (
    GradientStore,
    StoreCorruptError,
    StoreMismatchError,
    tree_checksum,
)

REPO = Path(__file__).resolve().parents[1]
N, D, WRITE_BLOCK = 203, 24, 32
FILES = ("gradients.npy", "ids.npy", "store.json")


def _data(seed=0):
    rng = np.random.default_rng(seed)
    # rows of very different norms, so that RelatIF / cosine really differ from influence
    G = (rng.normal(size=(N, D)) * rng.lognormal(sigma=0.7, size=(N, 1))).astype(np.float32)
    ids = (1000 + rng.permutation(N)).astype(np.int64)
    return G, ids


def _meta(seed=0):
    return {
        "layers": [[4, 3], [3, 4]],
        "projection_seed": seed,
        "model": tree_checksum({"w": np.arange(6.0, dtype=np.float32)}),
    }


def _write_all(path, G, ids, dtype="float16"):
    with GradientStore.create(path, N, D, dtype=dtype, metadata=_meta()) as s:
        for start in range(0, N, WRITE_BLOCK):
            s.write(G[start : start + WRITE_BLOCK], ids[start : start + WRITE_BLOCK])


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from bilevel_jax.influence.store import GradientStore
    path, data, meta, block, blocks = sys.argv[1:6]
    G, ids = np.load(data + "/G.npy"), np.load(data + "/ids.npy")
    import json
    s = GradientStore.create(path, G.shape[0], G.shape[1], dtype="float16",
                             metadata=json.loads(meta))
    b = int(block)
    for i in range(int(blocks)):
        s.write(G[i * b : (i + 1) * b], ids[i * b : (i + 1) * b])
    # a torn next block: rows and ids reach the files, the sidecar is never updated
    grads = np.lib.format.open_memmap(os.path.join(path, "gradients.npy"), mode="r+")
    grads[int(blocks) * b : int(blocks) * b + b // 2] = np.float16(-7.0)
    grads.flush()
    print("KILLING", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_store_resumes_byte_identical(tmp_path):
    G, ids = _data()
    _write_all(tmp_path / "ref", G, ids)

    np.save(tmp_path / "G.npy", G)
    np.save(tmp_path / "ids.npy", ids)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JAX_PLATFORMS"] = "cpu"
    run = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, str(run), str(tmp_path), json.dumps(_meta()), "32", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert "KILLING" in p.stdout

    # the killed store: the sidecar counts the 3 complete blocks; the torn rows are on disk
    assert json.loads((run / "store.json").read_text())["rows_written"] == 3 * WRITE_BLOCK
    assert (run / "gradients.npy").read_bytes() != (tmp_path / "ref" / "gradients.npy").read_bytes()
    partial = GradientStore.open(run)
    assert partial.rows_written == 96 and not partial.complete and not partial.writable
    ref = GradientStore.open(tmp_path / "ref")
    np.testing.assert_array_equal(partial.read(0, 96), ref.read(0, 96))
    np.testing.assert_array_equal(partial.ids, ids[:96])
    with pytest.raises(ValueError, match="outside the 96 written rows"):
        partial.read(90, 97)
    with pytest.raises(ValueError, match="read-only"):
        partial.write(G[96:128], ids[96:128])
    with pytest.raises(ValueError, match="96 of its 203 rows"):
        scoring.score_store(partial, G[:2], mode="dot")
    partial.close()

    # resume (via create(resume=True), as a restarted job would) and finish
    with GradientStore.create(run, N, D, dtype="float16", metadata=_meta(), resume=True) as s:
        assert s.rows_written == 96
        for start in range(s.rows_written, N, WRITE_BLOCK):
            s.write(G[start : start + WRITE_BLOCK], ids[start : start + WRITE_BLOCK])
        assert s.complete
    for name in FILES:
        assert (run / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert not (run / "store.json.tmp").exists()


def test_resume_checks_metadata_and_files(tmp_path):
    G, ids = _data()
    path = tmp_path / "s"
    with GradientStore.create(path, N, D, metadata=_meta()) as s:
        s.write(G[:10], ids[:10])

    other_model = dict(_meta(), model=tree_checksum({"w": np.arange(6.0, dtype=np.float32) + 1}))
    with pytest.raises(
        StoreMismatchError, match=r"metadata\['model'\]: the store has '[0-9a-f]{64}'"
    ):
        GradientStore.open(path, resume=True, metadata=other_model)
    with pytest.raises(StoreMismatchError, match=r"metadata\['projection_seed'\]: .* has 0, .* 1"):
        GradientStore.open(path, resume=True, metadata=_meta(seed=1))
    with pytest.raises(
        StoreMismatchError, match=r"metadata\['layers'\]: the store has \[\[4, 3\], \[3, 4\]\]"
    ):
        GradientStore.open(path, resume=True, metadata=dict(_meta(), layers=[[4, 3], [3, 5]]))
    with pytest.raises(
        StoreMismatchError, match=r"metadata\['extra'\] is given by the caller but not in"
    ):
        GradientStore.open(path, resume=True, metadata=dict(_meta(), extra=1))
    with pytest.raises(TypeError, match="needs the caller's metadata"):
        GradientStore.open(path, resume=True)
    with pytest.raises(StoreMismatchError, match="d: the store has 24, the caller 25"):
        GradientStore.create(path, N, D + 1, metadata=_meta(), resume=True)
    with pytest.raises(StoreMismatchError, match="dtype: the store has float16, the caller"):
        GradientStore.create(path, N, D, dtype="bfloat16", metadata=_meta(), resume=True)
    with pytest.raises(FileExistsError, match="resume=True"):
        GradientStore.create(path, N, D, metadata=_meta())
    with pytest.raises(TypeError, match="JSON-able"):
        GradientStore.create(tmp_path / "t", N, D, metadata={"x": np.arange(2)})
    with pytest.raises(FileNotFoundError, match="no store"):
        GradientStore.open(tmp_path / "nothing")
    # tuples and lists are the same metadata (JSON round trip)
    meta_tuples = dict(_meta(), layers=((4, 3), (3, 4)))
    with GradientStore.open(path, resume=True, metadata=meta_tuples) as s:
        assert s.rows_written == 10 and s.metadata == _meta()
        with pytest.raises(ValueError, match=r"shape \(b, 24\)"):
            s.write(G[:3, :5], ids[:3])
        with pytest.raises(ValueError, match=r"ids must have shape \(3,\)"):
            s.write(G[:3], ids[:2])
        with pytest.raises(TypeError, match="integers"):
            s.write(G[:3], ids[:3].astype(float))
        bad = G[:3].copy()
        bad[1, 2] = np.nan
        with pytest.raises(ValueError, match="row 1 .* is not finite"):
            s.write(bad, ids[:3])
        with pytest.raises(ValueError, match="exceed the store's n=203"):
            s.write(np.zeros((N, D)), np.arange(N))
        assert s.rows_written == 10  # nothing was written by the failed calls

    # a truncated gradients file (and a lost ids file) are refused with the reason
    with open(path / "gradients.npy", "r+b") as f:
        f.truncate(os.path.getsize(path / "gradients.npy") - 2)
    with pytest.raises(StoreCorruptError, match="truncated"):
        GradientStore.open(path, resume=True, metadata=_meta())
    # overwrite replaces it
    with GradientStore.create(path, N, D, metadata=_meta(), overwrite=True) as s:
        assert s.rows_written == 0
    os.remove(path / "ids.npy")
    with pytest.raises(StoreCorruptError, match="ids.npy"):
        GradientStore.create(path, N, D, metadata=_meta(), resume=True)


@pytest.mark.parametrize(
    ("dtype", "eps"), [("float16", 2.0**-11), ("bfloat16", 2.0**-8), ("float32", 0.0)]
)
def test_low_precision_round_trip_and_float32_fisher(tmp_path, dtype, eps):
    G, ids = _data()
    _write_all(tmp_path / dtype, G, ids, dtype=dtype)
    s = GradientStore.open(tmp_path / dtype, metadata=_meta())
    back = s.read(0, N)
    assert back.dtype == np.float32
    cast = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
    np.testing.assert_array_equal(back, G.astype(cast).astype(np.float32))  # round to nearest
    # within the dtype's precision: a relative half-ulp (plus float16's subnormal half-spacing)
    assert np.all(np.abs(back - G) <= eps * np.abs(G) + (2.0**-25 if dtype == "float16" else 0))
    if dtype != "float32":
        assert np.abs(back - G).max() > 0  # the storage really is lower precision
    raw = np.load(tmp_path / dtype / "gradients.npy", mmap_mode="r")
    assert raw.dtype == {"bfloat16": np.uint16}.get(dtype, np.dtype(dtype))
    np.testing.assert_array_equal(s.ids, ids)

    F = scoring.projected_fisher(s, block_size=50)
    assert F.dtype == np.float32
    G64 = back.astype(np.float64)
    F64 = G64.T @ G64 / N
    np.testing.assert_allclose(np.asarray(F), F64, rtol=2e-5, atol=2e-5 * np.abs(F64).max())


def test_float16_overflow_is_an_error(tmp_path):
    with GradientStore.create(tmp_path, 2, 2) as s:
        with pytest.raises(ValueError, match="float16's range .* dtype='bfloat16'"):
            s.write([[7e4, 0.0]], [0])
        s.write([[6e4, 0.0]], [0])
        assert s.read(0, 1)[0, 0] == 6e4


def _dense(G, Q, delta=None):
    """float64 oracle: (scores per mode, self-influence per mode, δ)."""
    G, Q = G.astype(np.float64), Q.astype(np.float64)
    F = G.T @ G / G.shape[0]
    delta = 0.1 * np.trace(F) / F.shape[0] if delta is None else delta
    Hinv = np.linalg.inv(F + delta * np.eye(F.shape[0]))
    infl = Q @ Hinv @ G.T
    self_g = np.einsum("nd,de,ne->n", G, Hinv, G)
    self_q = np.einsum("md,de,me->m", Q, Hinv, Q)
    scores = {
        "dot": Q @ G.T,
        "influence": infl,
        "relatif": infl / np.sqrt(self_g)[None, :],
        "cosine": infl / np.sqrt(self_q)[:, None] / np.sqrt(self_g)[None, :],
    }
    return scores, {"dot": np.sum(G * G, 1), "influence": self_g}, delta


def _close(got, want, rtol=2e-4):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_block_scores_equal_dense_scores_and_top_k(tmp_path):
    G, ids = _data()
    Q = np.random.default_rng(1).normal(size=(5, D)).astype(np.float32)
    _write_all(tmp_path / "s", G, ids, dtype="float32")
    store = GradientStore.open(tmp_path / "s")
    Gs = store.read(0, N)
    block = 64  # 203 = 3 · 64 + 11: the last block is padded and masked
    fisher = scoring.fisher_eigh(scoring.projected_fisher(store, block_size=block))
    want, want_self, _ = _dense(Gs, Q)
    for mode in scoring.MODES:
        got = scoring.score_store(store, Q, mode=mode, fisher=fisher, block_size=block)
        assert got.shape == (5, N) and got.dtype == np.float32
        _close(got, want[mode])
        # an in-memory array and fisher=None (computed from the store) give the same scores
        _close(scoring.score_store(Gs, Q, mode=mode, block_size=block), want[mode])
        for largest in (True, False):
            top = scoring.top_k_influence(
                store, Q, 7, mode=mode, fisher=fisher, block_size=block, largest=largest
            )
            order = np.argsort(-want[mode] if largest else want[mode], axis=1, kind="stable")
            np.testing.assert_array_equal(top.rows, order[:, :7])
            np.testing.assert_array_equal(top.ids, ids[order[:, :7]])
            _close(top.values, np.take_along_axis(want[mode], order[:, :7], axis=1))
    # the oracle's modes really differ: cosine lies in [-1, 1], RelatIF is not a rescaling
    assert np.abs(want["cosine"]).max() <= 1 + 1e-12
    assert np.abs(np.corrcoef(want["relatif"].ravel(), want["influence"].ravel())[0, 1]) < 0.99
    for mode in ("dot", "influence"):
        got = scoring.self_influence(store, mode=mode, fisher=fisher, block_size=block)
        _close(got, want_self[mode])
    # k = n returns every row, never a padded one (the mask); a block size above n works too
    for size in (block, 1000):
        top = scoring.top_k_influence(store, Q[:1], N, mode="dot", block_size=size)
        np.testing.assert_array_equal(top.rows[0], np.argsort(-want["dot"][0], kind="stable"))

    with pytest.raises(ValueError, match="mode must be one of"):
        scoring.score_store(store, Q, mode="tracin")
    with pytest.raises(ValueError, match=r"queries must be an \(m, 24\) array"):
        scoring.score_store(store, Q[:, :5])
    with pytest.raises(ValueError, match=r"k must be in \[1, n=203\]"):
        scoring.top_k_influence(store, Q, 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        scoring.self_influence(store, mode="cosine")
    with pytest.raises(TypeError, match="FisherEigen"):
        scoring.score_store(store, Q, fisher=np.eye(D))  # type: ignore[arg-type]


def test_scoring_compiles_once_across_blocks(tmp_path):
    G, ids = _data()
    _write_all(tmp_path / "s", G, ids)
    store = GradientStore.open(tmp_path / "s")
    Q = np.ones((3, D), np.float32)
    fisher = scoring.fisher_eigh(scoring.projected_fisher(store, block_size=64))
    block = 45  # 5 blocks, the last one of 23 rows (shapes unique to this test)
    scoring._TRACES.clear()
    for _ in range(2):
        scoring.score_store(store, Q, mode="relatif", fisher=fisher, block_size=block)
        scoring.top_k_influence(store, Q, 4, mode="cosine", fisher=fisher, block_size=block)
        scoring.self_influence(store, fisher=fisher, block_size=block)
        scoring.projected_fisher(store, block_size=block)
    assert scoring._TRACES == {
        "score_block": 1,
        "top_k_block": 1,
        "self_block": 1,
        "fisher_block": 1,
    }


def test_default_damping_and_eigendecomposition_reuse():
    G, _ = _data()
    Q = np.random.default_rng(2).normal(size=(4, D)).astype(np.float32)
    F = scoring.projected_fisher(G, block_size=64)
    eig = scoring.fisher_eigh(F)
    F64 = G.astype(np.float64).T @ G.astype(np.float64) / N
    lam = np.linalg.eigvalsh(F64)
    np.testing.assert_allclose(np.asarray(eig.eigenvalues), lam, rtol=1e-4, atol=1e-5 * lam.max())
    delta = scoring.default_damping(eig)
    np.testing.assert_allclose(delta, 0.1 * lam.mean(), rtol=1e-5)
    _close(scoring.score_store(G, Q, fisher=eig), _dense(G, Q)[0]["influence"])

    # one eigendecomposition, two other δ: each equals its own dense solve
    for d in (0.01 * lam.mean(), 3.0 * lam.mean()):
        want = _dense(G, Q, delta=d)[0]
        got = scoring.score_store(G, Q, fisher=eig, damping=d, block_size=64)
        # float32 eigenvectors against a float64 solve: the rounding of (F + δI)⁻¹ grows with
        # its condition number, up to 10× larger at δ = 0.01·mean(λ) than at the default δ
        _close(got, want["influence"], rtol=1e-3 if d < 0.1 * lam.mean() else 2e-4)
        Hinv = np.linalg.inv(F64 + d * np.eye(D))
        _close(np.asarray(scoring.precondition(eig, np.eye(D), d)), Hinv, rtol=1e-3)
    assert not np.allclose(
        scoring.score_store(G, Q, fisher=eig, damping=0.01 * lam.mean()),
        scoring.score_store(G, Q, fisher=eig, damping=3.0 * lam.mean()),
        rtol=1e-2,
    )

    with pytest.raises(ValueError, match="damping must be a finite"):
        scoring.score_store(G, Q, fisher=eig, damping=-1.0)
    singular = scoring.fisher_eigh(np.diag([1.0, 0.0]))
    with pytest.raises(ValueError, match="singular"):
        scoring.precondition(singular, Q[:, :2], damping=0.0)
    with pytest.raises(ValueError, match="the Fisher is zero"):
        scoring.score_store(np.zeros((3, D)), Q)


def test_fisher_eigh_and_precondition_under_jit():
    """The whole projected-Fisher pipeline compiles as one program: eigh, default δ and the
    preconditioning under ``jax.jit`` equal the eager call (and its dense oracle)."""
    import jax

    G, _ = _data()
    Q = np.random.default_rng(3).normal(size=(4, D)).astype(np.float32)

    def pipeline(G, Q):
        eig = scoring.fisher_eigh(G.T @ G / G.shape[0])
        return scoring.precondition(eig, Q), scoring.default_damping(eig)

    (got, delta), (want, want_delta) = jax.jit(pipeline)(G, Q), pipeline(G, Q)
    assert isinstance(want_delta, float)  # eager: a Python float
    np.testing.assert_allclose(float(delta), want_delta, rtol=1e-5)
    _close(np.asarray(got), np.asarray(want), rtol=1e-4)
    F64 = G.astype(np.float64).T @ G.astype(np.float64) / N
    dense = Q @ np.linalg.inv(F64 + want_delta * np.eye(D))
    _close(np.asarray(got), dense, rtol=1e-3)

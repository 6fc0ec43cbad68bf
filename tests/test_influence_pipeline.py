"""bj.influence.log_gradients: the one-pass logging of LoGra-projected gradients, against the
generic path (vmap-grad, then project), the dense Fisher, and an uninterrupted pass (resume)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bilevel_jax as bj
from bilevel_jax import influence as inf

N, BLOCK = 17, 7  # three blocks, the last one short


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1, self.fc2 = nnx.Linear(5, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


def loss(model, example):
    x, y = example
    return -jax.nn.log_softmax(model(x))[y]


def _setup():
    model = MLP(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    proj = inf.random_projections(jax.random.key(1), params, 4, 2)
    x = jax.random.normal(jax.random.key(2), (N, 5))
    y = jax.random.randint(jax.random.key(3), (N,), 0, 3)
    ids = 100 + np.arange(N)
    blocks = [
        (ids[s : s + BLOCK], (x[s : s + BLOCK], y[s : s + BLOCK])) for s in range(0, N, BLOCK)
    ]
    graphdef, _, rest = bj.nnx.split_params(model)

    def loss_p(p, example):
        return loss(bj.nnx.merge(graphdef, p, rest), example)

    want = inf.flatten_projected(
        inf.project_gradients(inf.per_example_grads(loss_p, params, (x, y)), proj)
    )
    return inf.with_logra(model, proj), blocks, np.asarray(want), ids


def _store(path, d, dtype="float32"):
    return inf.GradientStore.create(path, n=N, d=d, dtype=dtype, metadata={"seed": 1})


def test_rows_and_fisher_equal_the_generic_path_and_a_dense_fisher(tmp_path):
    lm, blocks, want, ids = _setup()
    d = want.shape[1]
    assert d == 4 * 2 + 4 * 2  # two layers of k_in × k_out = 4 × 2
    with _store(tmp_path / "s", d) as store:
        per_layer = inf.log_gradients(lm, loss, blocks, store)
    stored = inf.GradientStore.open(tmp_path / "s")
    np.testing.assert_allclose(stored.read(0, N), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stored.ids, ids)
    dense = want.T.astype(np.float64) @ want / N
    assert set(per_layer) == {"fc1", "fc2"}
    np.testing.assert_allclose(per_layer["fc1"], dense[:8, :8], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(per_layer["fc2"], dense[8:, 8:], rtol=1e-5, atol=1e-7)
    with _store(tmp_path / "f", d) as store:
        full = inf.log_gradients(lm, loss, blocks, store, fisher="full")
    np.testing.assert_allclose(full, dense, rtol=1e-5, atol=1e-7)
    # the Fisher is ready for damping after the fact
    eig = inf.fisher_eigh(per_layer["fc1"])
    assert inf.default_damping(eig) == pytest.approx(0.1 * np.trace(dense[:8, :8]) / 8, rel=1e-4)


def test_a_killed_pass_resumes_to_the_same_store_and_fisher(tmp_path):
    lm, blocks, want, _ = _setup()
    d = want.shape[1]
    with _store(tmp_path / "full", d) as store:
        fisher = inf.log_gradients(lm, loss, blocks, store, fisher="full")

    def killed():  # the pass dies while the third block is being read
        yield blocks[0]
        yield blocks[1]
        raise KeyboardInterrupt

    store = _store(tmp_path / "resumed", d)
    with pytest.raises(KeyboardInterrupt):
        inf.log_gradients(lm, loss, killed(), store)
    store.close()
    assert inf.GradientStore.open(tmp_path / "resumed").rows_written == BLOCK  # one block in flight
    store = inf.GradientStore.open(tmp_path / "resumed", resume=True, metadata={"seed": 1})
    again = inf.log_gradients(lm, loss, blocks, store, fisher="full")
    store.close()
    a, b = inf.GradientStore.open(tmp_path / "full"), inf.GradientStore.open(tmp_path / "resumed")
    np.testing.assert_array_equal(a.read(0, N), b.read(0, N))
    np.testing.assert_array_equal(a.ids, b.ids)
    # the same float32 products, summed in another order (the first block's last)
    np.testing.assert_allclose(again, fisher, rtol=1e-5, atol=1e-6 * float(np.abs(fisher).max()))
    # resuming with other blocks than the first time is an error, not a silent mix
    store = inf.GradientStore.open(tmp_path / "resumed", resume=True, metadata={"seed": 1})
    other = [(ids + 1, batch) for ids, batch in blocks]
    with pytest.raises(ValueError, match="ids at rows 0:7"):
        inf.log_gradients(lm, loss, other, store)


def test_one_compilation_serves_every_block(tmp_path):
    """The loss is traced the same number of times for two blocks as for three (the third one
    short and padded): the blocks share one compiled step."""
    lm, blocks, want, _ = _setup()
    counts = []
    for n_blocks in (2, 3):
        traces = []

        def counted(model, example, traces=traces):  # a new function: nothing cached for it
            traces.append(1)
            return loss(model, example)

        n = sum(len(ids) for ids, _ in blocks[:n_blocks])
        with inf.GradientStore.create(tmp_path / str(n_blocks), n=n, d=want.shape[1]) as store:
            inf.log_gradients(lm, counted, blocks[:n_blocks], store)
        counts.append(len(traces))
    assert counts[0] == counts[1] > 0


def test_clear_errors(tmp_path):
    lm, blocks, want, _ = _setup()
    d = want.shape[1]
    with pytest.raises(ValueError, match="no LoGra adapter"):
        inf.log_gradients(MLP(nnx.Rngs(0)), loss, blocks, _store(tmp_path / "a", d))
    with pytest.raises(ValueError, match="the store has d = 5"):
        inf.log_gradients(lm, loss, blocks, _store(tmp_path / "b", 5))
    short_first = [blocks[2], blocks[0], blocks[1]]
    with pytest.raises(ValueError, match="every block but the last"):
        inf.log_gradients(lm, loss, short_first, _store(tmp_path / "c", d))
    with pytest.raises(ValueError, match="the store has n = 17"):
        inf.log_gradients(lm, loss, blocks[:2], _store(tmp_path / "d", d))
    with pytest.raises(ValueError, match="fisher must be"):
        inf.log_gradients(lm, loss, blocks, _store(tmp_path / "e", d), fisher="diag")  # type: ignore[arg-type]

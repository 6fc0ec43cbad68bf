"""LoGra projections (bilevel_jax.influence.logra): the adapter against vmap-grad, exactness at full
rank, the KFAC/PCA bases against brute force, and the errors.

Oracles: autodiff per-example gradients projected by a numpy einsum; dense numpy inner products and
block-diagonal empirical-Fisher solves; covariances from a hand-written functional forward with
explicit zero perturbations of each layer's output; numpy eigendecompositions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bilevel_jax as bj
from bilevel_jax.influence import logra as lg

F64 = jnp.float64


class SeqMLP(nnx.Module):
    """tanh MLP of nnx.Linear layers, applied to the last axis (so per position of a sequence)."""

    def __init__(self, sizes, biases, *, rngs, dtype=F64):
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, use_bias=u, param_dtype=dtype, rngs=rngs)
                for a, b, u in zip(sizes[:-1], sizes[1:], biases)
            ]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


def example_loss(model, example):
    """One example's summed cross entropy over its positions (x: (T, d) or (d,))."""
    x, y = example
    logp = jax.nn.log_softmax(model(x))
    return -jnp.sum(jnp.take_along_axis(logp, y[..., None], axis=-1))


def square_loss(model, example):
    """One example's summed squared error (a full-rank output curvature, unlike softmax's)."""
    x, y = example
    return 0.5 * jnp.sum((model(x) - y) ** 2)


def make_batch(key, n, T, d, classes, dtype=F64):
    kx, ky = jax.random.split(key)
    shape = (n, d) if T is None else (n, T, d)
    x = jax.random.normal(kx, shape, dtype)
    y = jax.random.randint(ky, shape[:-1], 0, classes)
    return x, y


def generic_grads(model, batch, example_loss=example_loss):
    """Full per-example gradients of the plain model's params (the reference path)."""
    graphdef, params, rest = bj.nnx.split_params(model)

    def loss(p, ex):
        return example_loss(bj.nnx.merge(graphdef, p, rest), ex)

    return jax.jit(lambda p, b: lg.per_example_grads(loss, p, b))(params, batch)


def numpy_project(grads, projections):
    """Oracle of project_gradients: augmented kernel [K; b] iff P_in has d_in + 1 rows."""
    out = {}
    for i, proj in projections["layers"].items():
        g = grads["layers"][i]
        k = np.asarray(g["kernel"])
        p_in, p_out = np.asarray(proj.p_in), np.asarray(proj.p_out)
        if p_in.shape[0] == k.shape[1] + 1:
            k = np.concatenate([k, np.asarray(g["bias"])[:, None, :]], axis=1)
        out[i] = np.einsum("ik,nij,jl->nkl", p_in, k, p_out)
    return out


def _proj(key, d_in, d_out, k_in, k_out):
    return lg.random_projection(key, d_in, d_out, k_in, k_out, kind="gaussian", dtype=F64)


@pytest.mark.parametrize("T", [None, 3])
def test_adapter_gradients_equal_projected_vmap_grad(x64, T):
    sizes, biases = (5, 6, 4, 3), (True, False, True)
    model = SeqMLP(sizes, biases, rngs=nnx.Rngs(0))
    batch = make_batch(jax.random.key(1), 7, T, sizes[0], sizes[-1])
    keys = jax.random.split(jax.random.key(2), 3)
    projections = {
        "layers": {
            0: _proj(keys[0], 5 + 1, 6, 3, 4),  # bias row: kernel and bias
            1: _proj(keys[1], 6, 4, 4, 2),  # no bias in the layer
            2: _proj(keys[2], 4, 3, 2, 3),  # the layer has a bias, left out (d_in rows)
        }
    }
    grads = generic_grads(model, batch)
    ref = lg.project_gradients(grads, projections)
    oracle = numpy_project(grads, projections)
    lm = lg.with_logra(model, projections)
    got = lg.logra_gradients(lm, example_loss, batch)
    got_chunked = lg.logra_gradients(lm, example_loss, batch, batch_size=3)

    assert jax.tree.structure(got) == jax.tree.structure(ref)
    for i in range(3):
        scale = np.max(np.abs(oracle[i]))
        assert scale > 1e-3  # a real signal, not zeros
        assert got["layers"][i].shape == oracle[i].shape
        np.testing.assert_allclose(ref["layers"][i], oracle[i], rtol=0, atol=1e-12 * scale)
        np.testing.assert_allclose(got["layers"][i], oracle[i], rtol=0, atol=1e-12 * scale)
        np.testing.assert_allclose(got_chunked["layers"][i], oracle[i], rtol=0, atol=1e-12 * scale)
    flat = lg.flatten_projected(got)
    assert flat.shape == (7, 3 * 4 + 4 * 2 + 2 * 3)
    np.testing.assert_allclose(flat[:, :12], got["layers"][0].reshape(7, -1), rtol=0, atol=0)


def test_adapter_keeps_outputs_and_parameter_gradients(x64):
    sizes, biases = (5, 6, 3), (True, True)
    model = SeqMLP(sizes, biases, rngs=nnx.Rngs(3))
    batch = make_batch(jax.random.key(4), 6, 4, sizes[0], sizes[-1])
    projections = lg.random_projections(
        jax.random.key(5), bj.nnx.split_params(model)[1], 3, 2, kind="gaussian"
    )
    lm = lg.with_logra(model, projections)
    assert type(model.layers[0]) is nnx.Linear  # the original is not modified
    assert type(lm.layers[0]).__name__ == "LoGraLinear"

    x = batch[0]
    np.testing.assert_array_equal(lm(x), model(x))

    def mean_loss(m):
        graphdef, params, rest = bj.nnx.split_params(m)

        def f(p):
            mm = bj.nnx.merge(graphdef, p, rest)
            return jnp.mean(jax.vmap(lambda ex: example_loss(mm, ex))(batch))

        return params, jax.jit(jax.grad(f))(params)

    params, g = mean_loss(model)
    params_l, g_l = mean_loss(lm)
    assert jax.tree.structure(params_l) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, params_l, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-14, atol=0), g_l, g)

    # the branch is live: with B ≠ 0 the first layer adds ((x̃ P_in) B) P_outᵀ
    layer = lm.layers[0]
    b = jax.random.normal(jax.random.key(6), layer.logra_b.shape, F64)
    layer.logra_b.set_value(b)
    p_in, p_out = projections["layers"][0]
    xt = np.concatenate([np.asarray(x), np.ones((*x.shape[:-1], 1))], axis=-1)
    expected = (
        np.asarray(model.layers[0](x)) + xt @ np.asarray(p_in) @ np.asarray(b) @ np.asarray(p_out).T
    )
    np.testing.assert_allclose(layer(x), expected, rtol=1e-12, atol=1e-12)


def _block_fisher_influence(train_blocks, query_blocks, damping):
    """Σ_l g_{q,l}ᵀ (F_l + δI)⁻¹ g_{i,l}, F_l = (1/n) Σ_i g_{i,l} g_{i,l}ᵀ (dense numpy)."""
    n = train_blocks[0].shape[0]
    total = 0.0
    for g, q in zip(train_blocks, query_blocks):
        fisher = g.T @ g / n + damping * np.eye(g.shape[1])
        total = total + q @ np.linalg.solve(fisher, g.T)
    return total


def test_full_rank_orthogonal_projection_is_exact(x64):
    sizes, biases = (3, 4, 2), (True, True)
    model = SeqMLP(sizes, biases, rngs=nnx.Rngs(7))
    n, m = 40, 5  # train and query examples, one batch (one compilation)
    batch = (
        jax.random.normal(jax.random.key(8), (n + m, 2, 3), F64),
        jax.random.normal(jax.random.key(18), (n + m, 2, 2), F64),
    )
    params = bj.nnx.split_params(model)[1]
    projections = lg.random_projections(
        jax.random.key(10), params, None, None, kind="orthogonal"
    )  # k = d, P orthogonal (with the bias row)
    for proj in projections["layers"].values():
        assert proj.p_in.shape[0] == proj.p_in.shape[1]
        np.testing.assert_allclose(proj.p_in.T @ proj.p_in, np.eye(proj.p_in.shape[0]), atol=1e-13)
    lm = lg.with_logra(model, projections)
    projected = lg.logra_gradients(lm, square_loss, batch)
    g = generic_grads(model, batch, square_loss)["layers"]
    full = [
        np.concatenate(
            [np.asarray(g[i]["kernel"]), np.asarray(g[i]["bias"])[:, None, :]], axis=1
        ).reshape(n + m, -1)
        for i in range(2)
    ]
    proj = [np.asarray(projected["layers"][i]).reshape(n + m, -1) for i in range(2)]
    full_train, full_query = [b[:n] for b in full], [b[n:] for b in full]
    proj_train, proj_query = [b[:n] for b in proj], [b[n:] for b in proj]

    # projected grad-dot = grad-dot (all parameters are covered at full rank)
    full_dot = np.hstack(full_query) @ np.hstack(full_train).T
    flat = np.asarray(lg.flatten_projected(projected))
    proj_dot = flat[n:] @ flat[:n].T
    assert np.max(np.abs(full_dot)) > 1e-2
    np.testing.assert_allclose(proj_dot, full_dot, rtol=0, atol=1e-12 * np.max(np.abs(full_dot)))

    # projected block-diagonal empirical-Fisher influence = the full one, damping → 0
    for damping in (1e-4, 1e-9):
        full_inf = _block_fisher_influence(full_train, full_query, damping)
        proj_inf = _block_fisher_influence(proj_train, proj_query, damping)
        np.testing.assert_allclose(
            proj_inf, full_inf, rtol=0, atol=1e-10 * np.max(np.abs(full_inf))
        )

    # and a rank-reducing projection does not reproduce grad-dot (the check can fail)
    small = lg.random_projections(jax.random.key(11), params, 2, 1, kind="orthogonal")
    lm_small = lg.with_logra(model, small)
    flat_small = np.asarray(lg.flatten_projected(lg.logra_gradients(lm_small, square_loss, batch)))
    small_dot = flat_small[n:] @ flat_small[:n].T
    assert np.max(np.abs(small_dot - full_dot)) > 1e-3 * np.max(np.abs(full_dot))


def brute_force_covariances(params, batch, biases):
    """A, S of each layer from a hand-written forward with zero perturbations of the outputs."""
    layers = params["layers"]
    nl = len(layers)

    def forward(eps, x, y):
        xs, h = [], x
        for i in range(nl):
            xs.append(h)
            z = h @ layers[i]["kernel"] + (layers[i]["bias"] if biases[i] else 0.0) + eps[i]
            h = jnp.tanh(z) if i < nl - 1 else z
        logp = jax.nn.log_softmax(h)
        return -jnp.sum(jnp.take_along_axis(logp, y[..., None], axis=-1)), xs

    @jax.jit
    def one(x, y):
        eps = [jnp.zeros((*x.shape[:-1], layers[i]["kernel"].shape[1]), F64) for i in range(nl)]
        return jax.grad(forward, has_aux=True)(eps, x, y)

    x_all, y_all = batch
    n = x_all.shape[0]
    A = [np.zeros((0,))] * nl
    S = [np.zeros((0,))] * nl
    for j in range(n):
        dys, xs = one(x_all[j], y_all[j])
        for i in range(nl):
            xi = np.asarray(xs[i]).reshape(-1, xs[i].shape[-1])
            if biases[i]:
                xi = np.hstack([xi, np.ones((xi.shape[0], 1))])
            di = np.asarray(dys[i]).reshape(-1, dys[i].shape[-1])
            A[i] = xi.T @ xi / n if j == 0 else A[i] + xi.T @ xi / n
            S[i] = di.T @ di / n if j == 0 else S[i] + di.T @ di / n
    return A, S


@pytest.mark.parametrize("T", [None, 3])
def test_kfac_covariances_and_pca_bases(x64, T):
    sizes, biases = (4, 5, 3), (True, False)
    model = SeqMLP(sizes, biases, rngs=nnx.Rngs(12))
    batch = make_batch(jax.random.key(13), 9, T, sizes[0], sizes[-1])
    params = bj.nnx.split_params(model)[1]
    A, S = brute_force_covariances(params, batch, biases)
    cov = lg.kfac_covariances(model, example_loss, batch)
    for i in range(2):
        np.testing.assert_allclose(cov["layers"][i].forward, A[i], rtol=0, atol=1e-12)
        np.testing.assert_allclose(cov["layers"][i].backward, S[i], rtol=0, atol=1e-12)
    assert cov["layers"][0].forward.shape == (5, 5)  # the bias row

    pca = lg.pca_projections(cov, 3, 2)
    for i in range(2):
        for c, p, k in ((A[i], pca["layers"][i].p_in, 3), (S[i], pca["layers"][i].p_out, 2)):
            _, vecs = np.linalg.eigh(c)
            top = vecs[:, ::-1][:, :k]
            assert p.shape == top.shape
            np.testing.assert_allclose(np.abs(np.sum(np.asarray(p) * top, axis=0)), 1, atol=1e-10)
    # the PCA projections fit the adapter (bias row where the covariance had one)
    lm = lg.with_logra(model, pca)
    assert lg.logra_gradients(lm, example_loss, batch)["layers"][0].shape == (9, 3, 2)

    only_first = lg.kfac_covariances(model, example_loss, batch, layers=[("layers", 0)], bias=False)
    np.testing.assert_allclose(only_first["layers"][0].forward, A[0][:4, :4], rtol=0, atol=1e-12)
    assert list(only_first["layers"]) == [0]


def test_clear_errors():
    model = SeqMLP((3, 4, 2), (True, False), rngs=nnx.Rngs(0), dtype=jnp.float32)
    key = jax.random.key(0)
    good0 = lg.Projection(jnp.eye(4, 2), jnp.eye(4, 2))
    good1 = lg.Projection(jnp.eye(4, 2), jnp.eye(2, 1))

    with pytest.raises(ValueError, match="p_in has 6 rows; this layer needs 4 .kernel and bias"):
        lg.with_logra(model, {"layers": {0: lg.Projection(jnp.eye(6, 2), jnp.eye(4, 2))}})
    with pytest.raises(ValueError, match="p_out has 3 rows; this layer needs 4"):
        lg.with_logra(model, {"layers": {0: lg.Projection(jnp.eye(4, 2), jnp.eye(3, 2))}})
    with pytest.raises(ValueError, match="the layer has no bias"):
        lg.with_logra(model, {"layers": {1: lg.Projection(jnp.eye(5, 2), jnp.eye(2, 1))}})
    with pytest.raises(ValueError, match="k = 5 columns > d = 4"):
        lg.with_logra(model, {"layers": {0: lg.Projection(jnp.ones((4, 5)), jnp.eye(4, 2))}})
    with pytest.raises(ValueError, match="k_in = 5 exceeds the dimension d = 4"):
        lg.random_projection(key, 4, 2, 5, 1)
    with pytest.raises(ValueError, match="k_out = 3 exceeds"):
        lg.random_projections(key, bj.nnx.split_params(model)[1], 2, 3)
    with pytest.raises(ValueError, match="kind must be"):
        lg.random_projection(key, 4, 2, 2, 1, kind="sparse")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="plain nnx.Linear, got List"):
        lg.with_logra(model, {"layers": good0})
    with pytest.raises(KeyError, match="no submodule at layers/7"):
        lg.with_logra(model, {"layers": {7: good0}})
    with pytest.raises(TypeError, match="pytree of Projection"):
        lg.with_logra(model, {"layers": {0: (jnp.eye(4, 2), jnp.eye(4, 2))}})
    lm = lg.with_logra(model, {"layers": {0: good0, 1: good1}})
    with pytest.raises(TypeError, match="already adapted"):
        lg.with_logra(lm, {"layers": {0: good0}})
    with pytest.raises(ValueError, match="no LoGra adapter"):
        lg.logra_gradients(model, example_loss, make_batch(key, 2, None, 3, 2, jnp.float32))

    # generic path: 1-D leaves and non-layer dicts are refused, missing layers named
    grads = {"layers": {0: {"kernel": jnp.ones((2, 3, 4)), "bias": jnp.ones((2, 4))}}}
    with pytest.raises(ValueError, match="LoGra projects 2-D"):
        lg.project_gradients(
            grads, {"layers": {0: {"bias": lg.Projection(jnp.eye(4, 1), jnp.eye(1))}}}
        )
    with pytest.raises(TypeError, match="name the layer"):
        lg.project_gradients(grads, {"layers": good0})
    with pytest.raises(KeyError, match="no entry layers/1"):
        lg.project_gradients(grads, {"layers": {1: good0}})

    class Twice(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(3, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.fc(x))

    with pytest.raises(ValueError, match="called more than once"):
        lg.kfac_covariances(Twice(nnx.Rngs(0)), lambda m, x: jnp.sum(m(x)), jnp.ones((2, 3)))


def test_projection_of_a_bare_2d_leaf(x64):
    g = jax.random.normal(jax.random.key(20), (3, 5, 4), F64)  # (n, d_in, d_out), no bias
    proj = _proj(jax.random.key(21), 5, 4, 2, 3)
    got = lg.project_gradients({"w": g, "scale": jnp.ones((3, 4))}, {"w": proj})
    expected = np.einsum("ik,nij,jl->nkl", proj.p_in, np.asarray(g), proj.p_out)
    assert list(got) == ["w"]  # the 1-D "scale" is not named, so left out
    np.testing.assert_allclose(got["w"], expected, rtol=0, atol=1e-13)

"""KFAC / EKFAC influence (bilevel_jax.influence.kfac) and the baselines (bilevel_jax.influence.baselines).

Oracles: dense numpy solves with kron(A, S) + δI (row-major vec); EKFAC's corrected eigenvalues by
brute force (dense per-example gradients rotated by the explicit matrix kron(Q_A, Q_S)ᵀ, squared,
averaged); a fully independent numpy pipeline for a single Linear with squared loss (closed-form
gradients x̃ rᵀ, covariances, numpy eigh, dense Q diag(Λ*) Qᵀ); a Fisher that is diagonal in the
Kronecker eigenbasis, where EKFAC equals the exact empirical-Fisher influence of bj.influence;
dense numpy dot products, pseudo-inverse-free TRAK at full rank, and numpy cosines.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bilevel_jax as bj
from bilevel_jax.influence import baselines as bl
from bilevel_jax.influence import kfac
from bilevel_jax.influence import logra as lg
from bilevel_jax.influence.exact import influence as exact_influence

F64 = jnp.float64


class SeqMLP(nnx.Module):
    """tanh MLP of nnx.Linear layers applied to the last axis (so per position of a sequence)."""

    def __init__(self, sizes, biases, *, rngs):
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, use_bias=u, param_dtype=F64, rngs=rngs)
                for a, b, u in zip(sizes[:-1], sizes[1:], biases)
            ]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


def ce_loss(model, example):
    x, y = example
    logp = jax.nn.log_softmax(model(x))
    return -jnp.sum(jnp.take_along_axis(logp, y[..., None], axis=-1))


def sq_loss(model, example):
    x, t = example
    return 0.5 * jnp.sum((model(x) - t) ** 2)


def grads_of(model, loss, batch):
    graphdef, params, rest = bj.nnx.split_params(model)
    return lg.per_example_grads(
        lambda p, z: loss(bj.nnx.merge(graphdef, p, rest), z), params, batch
    )


def dense_augmented(g_layer, with_bias):
    """(n, a, b) numpy augmented gradients [kernel; bias] of one layer's gradient dict."""
    k = np.asarray(g_layer["kernel"])
    if with_bias:
        k = np.concatenate([k, np.asarray(g_layer["bias"])[:, None, :]], axis=1)
    return k


def random_psd(rng, d):
    m = rng.normal(size=(d, d))
    return m @ m.T / d + 0.05 * np.eye(d)


# ----------------------------------------------------------------------------- KFAC inverse


def test_kfac_precondition_equals_dense_kron_inverse(x64):
    rng = np.random.default_rng(0)
    a, b, delta = 4, 3, 0.3
    A, S = random_psd(rng, a), random_psd(rng, b)
    basis = kfac.kfac_eigenbasis({"fc": lg.Covariances(jnp.asarray(A), jnp.asarray(S))})
    e = basis["fc"]
    np.testing.assert_allclose(np.asarray(e.q_in @ jnp.diag(e.lam_in) @ e.q_in.T), A, atol=1e-12)
    G = rng.normal(size=(5, a, b))
    out = np.asarray(kfac.kfac_precondition(basis, {"fc": jnp.asarray(G)}, delta)["fc"])
    dense = np.kron(A, S) + delta * np.eye(a * b)  # row-major vec(G) pairs with kron(A, S)
    want = np.linalg.solve(dense, G.reshape(5, -1).T).T.reshape(5, a, b)
    np.testing.assert_allclose(out, want, rtol=1e-11, atol=1e-12)
    # the column-major pairing kron(S, A) is a different matrix: the vec order matters
    wrong = np.linalg.solve(np.kron(S, A) + delta * np.eye(a * b), G.reshape(5, -1).T).T
    assert np.abs(wrong - want.reshape(5, -1)).max() > 1e-3

    # default damping: 0.1 × mean eigenvalue of A ⊗ S (= 0.1 · tr(A) tr(S) / (ab))
    d0 = 0.1 * np.trace(A) * np.trace(S) / (a * b)
    out0 = np.asarray(kfac.kfac_precondition(basis, {"fc": jnp.asarray(G)})["fc"])
    want0 = np.linalg.solve(np.kron(A, S) + d0 * np.eye(a * b), G.reshape(5, -1).T).T
    np.testing.assert_allclose(out0.reshape(5, -1), want0, rtol=1e-11, atol=1e-12)

    # EKFAC: the same basis with given eigenvalues is Q diag(Λ) Qᵀ
    lam = rng.uniform(0.1, 2.0, size=(a, b))
    Q = np.kron(np.asarray(e.q_in), np.asarray(e.q_out))
    C = Q @ np.diag(lam.reshape(-1)) @ Q.T
    out_e = kfac.kfac_precondition(basis, {"fc": jnp.asarray(G)}, delta, eigenvalues={"fc": lam})
    want_e = np.linalg.solve(C + delta * np.eye(a * b), G.reshape(5, -1).T).T
    np.testing.assert_allclose(
        np.asarray(out_e["fc"]).reshape(5, -1), want_e, rtol=1e-11, atol=1e-12
    )


# ----------------------------------------------------------------------------- EKFAC eigenvalues


@pytest.mark.parametrize("T", [None, 3])
def test_ekfac_eigenvalues_and_influence_brute_force(x64, T):
    sizes, biases = (4, 5, 3), (True, False)
    model = SeqMLP(sizes, biases, rngs=nnx.Rngs(0))
    n, m = 9, 4
    shape = (n + m, sizes[0]) if T is None else (n + m, T, sizes[0])
    x = jax.random.normal(jax.random.key(1), shape, F64)
    y = jax.random.randint(jax.random.key(2), shape[:-1], 0, sizes[-1])
    train, query = (x[:n], y[:n]), (x[n:], y[n:])

    basis = kfac.kfac_eigenbasis(lg.kfac_covariances(model, ce_loss, train))
    g_train, g_query = grads_of(model, ce_loss, train), grads_of(model, ce_loss, query)
    lam = kfac.ekfac_eigenvalues(basis, g_train)

    delta = 0.05
    want_scores = np.zeros((m, n))
    for l, with_bias in enumerate(biases):
        e = basis["layers"][l]
        Gt = dense_augmented(g_train["layers"][l], with_bias)
        Gq = dense_augmented(g_query["layers"][l], with_bias)
        a, b = Gt.shape[1:]
        assert e.q_in.shape == (a, a) and e.q_out.shape == (b, b)
        Q = np.kron(np.asarray(e.q_in), np.asarray(e.q_out))  # explicit (ab × ab) rotation
        rot = Gt.reshape(n, -1) @ Q  # row i: (kron(Q_A, Q_S)ᵀ vec G_i)ᵀ
        brute = np.mean(rot**2, axis=0).reshape(a, b)
        np.testing.assert_allclose(np.asarray(lam["layers"][l]), brute, rtol=1e-11, atol=1e-14)
        # Λ* is the diagonal of the dense empirical Fisher in the eigenbasis
        F = Gt.reshape(n, -1).T @ Gt.reshape(n, -1) / n
        np.testing.assert_allclose(
            np.diag(Q.T @ F @ Q).reshape(a, b), brute, rtol=1e-10, atol=1e-14
        )
        C = Q @ np.diag(brute.reshape(-1)) @ Q.T + delta * np.eye(a * b)
        want_scores += Gq.reshape(m, -1) @ np.linalg.solve(C, Gt.reshape(n, -1).T)

    got = np.asarray(kfac.ekfac_influence(basis, lam, g_query, g_train, delta))
    np.testing.assert_allclose(got, want_scores, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- one Linear


def numpy_single_linear(K, bvec, x, t, xq, tq, delta):
    """Independent numpy (E)KFAC scores of y = x K + b with loss ½‖y − t‖² (G_i = x̃_i r_iᵀ)."""
    aug = lambda z: np.concatenate([z, np.ones((len(z), 1))], axis=1)  # noqa: E731
    xt, xqt = aug(x), aug(xq)
    r, rq = x @ K + bvec - t, xq @ K + bvec - tq
    G = np.einsum("ni,nj->nij", xt, r).reshape(len(x), -1)
    Gq = np.einsum("ni,nj->nij", xqt, rq).reshape(len(xq), -1)
    A, S = xt.T @ xt / len(x), r.T @ r / len(x)
    la, qa = np.linalg.eigh(A)
    ls, qs = np.linalg.eigh(S)
    Q = np.kron(qa, qs)
    lam_star = np.mean((G @ Q) ** 2, axis=0)
    d = len(lam_star)
    C_ekfac = Q @ np.diag(lam_star) @ Q.T + delta * np.eye(d)
    C_kfac = np.kron(A, S) + delta * np.eye(d)
    return Gq @ np.linalg.solve(C_ekfac, G.T), Gq @ np.linalg.solve(C_kfac, G.T)


def test_single_linear_matches_independent_numpy_pipeline(x64):
    model = nnx.Linear(4, 3, param_dtype=F64, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(4)
    n, m, delta = 12, 3, 0.02
    x, t = rng.normal(size=(n, 4)), rng.normal(size=(n, 3))
    xq, tq = rng.normal(size=(m, 4)), rng.normal(size=(m, 3))
    train, query = (jnp.asarray(x), jnp.asarray(t)), (jnp.asarray(xq), jnp.asarray(tq))

    basis = kfac.kfac_eigenbasis(lg.kfac_covariances(model, sq_loss, train))  # a root KronEigen
    assert isinstance(basis, kfac.KronEigen)
    g_train, g_query = grads_of(model, sq_loss, train), grads_of(model, sq_loss, query)
    lam = kfac.ekfac_eigenvalues(basis, g_train)
    got_e = np.asarray(kfac.ekfac_influence(basis, lam, g_query, g_train, delta))
    got_k = np.asarray(kfac.kfac_influence(basis, g_query, g_train, delta))

    params = bj.nnx.split_params(model)[1]
    K, bvec = np.asarray(params["kernel"]), np.asarray(params["bias"])
    want_e, want_k = numpy_single_linear(K, bvec, x, t, xq, tq, delta)
    np.testing.assert_allclose(got_e, want_e, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_k, want_k, rtol=1e-10, atol=1e-12)
    assert np.abs(want_e - want_k).max() > 1e-3 * np.abs(want_e).max()  # they differ here

    # kfac_precondition on layer_gradients gives the same scores as kfac_influence
    gt = kfac.layer_gradients(g_train, basis)
    gq = kfac.layer_gradients(g_query, basis)
    pre = kfac.kfac_precondition(basis, gt, delta, eigenvalues=lam)
    np.testing.assert_allclose(
        np.einsum("mab,nab->mn", np.asarray(gq), np.asarray(pre)), want_e, rtol=1e-10, atol=1e-12
    )


def test_ekfac_equals_exact_fisher_influence_when_fisher_is_diagonal_in_the_basis(x64):
    """x_i ∝ e_j(i), residuals ∝ e_k(i): every G_i is one entry, so the empirical Fisher is
    diagonal in the (standard) Kronecker eigenbasis and EKFAC is exact; KFAC is not."""
    model = nnx.Linear(3, 2, use_bias=False, param_dtype=F64, rngs=nnx.Rngs(0))
    model.kernel.set_value(jnp.zeros((3, 2), F64))
    j, k = np.array([0, 1, 2, 0, 1, 2]), np.array([0, 1, 1, 0, 0, 1])
    amp_x, amp_r = np.array([1, 2, 3, 1.5, 0.5, 1]), np.array([1, 1, 2, 3, 1, 0.5])
    x = np.eye(3)[j] * amp_x[:, None]
    t = -np.eye(2)[k] * amp_r[:, None]  # y = 0, so the residual is −t
    rng = np.random.default_rng(1)
    xq, tq = rng.normal(size=(3, 3)), rng.normal(size=(3, 2))
    train, query = (jnp.asarray(x), jnp.asarray(t)), (jnp.asarray(xq), jnp.asarray(tq))

    basis = kfac.kfac_eigenbasis(lg.kfac_covariances(model, sq_loss, train))
    g_train, g_query = grads_of(model, sq_loss, train), grads_of(model, sq_loss, query)
    lam = kfac.ekfac_eigenvalues(basis, g_train)
    delta = 0.1
    got = np.asarray(kfac.ekfac_influence(basis, lam, g_query, g_train, delta))

    def per_example_loss(p, batch):
        return 0.5 * jnp.sum((batch[0] @ p["kernel"] - batch[1]) ** 2, axis=1)

    params = {"kernel": jnp.zeros((3, 2), F64)}
    want = np.asarray(
        exact_influence(per_example_loss, params, train, query, curvature="fisher", damping=delta)
    )
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    kf = np.asarray(kfac.kfac_influence(basis, g_query, g_train, delta))
    assert np.abs(kf - want).max() > 1e-2 * np.abs(want).max()


# ----------------------------------------------------------------------------- baselines


def test_grad_dot_and_trak_against_dense(x64):
    rng = np.random.default_rng(5)
    n, m = 20, 3
    tr = {"a": rng.normal(size=(n, 2, 3)), "b": rng.normal(size=(n, 4))}
    qu = {"a": rng.normal(size=(m, 2, 3)), "b": rng.normal(size=(m, 4))}
    G = np.concatenate([tr["a"].reshape(n, -1), tr["b"]], axis=1)
    Gq = np.concatenate([qu["a"].reshape(m, -1), qu["b"]], axis=1)
    tr_j, qu_j = jax.tree.map(jnp.asarray, tr), jax.tree.map(jnp.asarray, qu)

    np.testing.assert_allclose(np.asarray(bl.grad_dot(qu_j, tr_j)), Gq @ G.T, rtol=1e-12)

    p = G.shape[1]  # 10 < n: GᵀG is invertible
    want = Gq @ np.linalg.solve(G.T @ G, G.T)  # Φ_q(ΦᵀΦ)⁻¹Φᵀ with Φ = GP, P invertible
    for seed in (0, 1):  # at k = p the projection cancels: any key gives the same scores
        got = np.asarray(bl.trak_scores(qu_j, tr_j, jax.random.key(seed), k=p))
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
    # k < p: a seeded sketch; the same key gives the same scores, another key others
    s1 = np.asarray(bl.trak_scores(qu_j, tr_j, jax.random.key(0), k=4, damping=0.1))
    s2 = np.asarray(bl.trak_scores(qu_j, tr_j, jax.random.key(0), k=4, damping=0.1))
    s3 = np.asarray(bl.trak_scores(qu_j, tr_j, jax.random.key(1), k=4, damping=0.1))
    np.testing.assert_array_equal(s1, s2)
    assert np.abs(s1 - s3).max() > 1e-6
    # the damped formula against a dense oracle with the same projection
    P = np.concatenate(
        [
            np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(0), j), (d, 4), F64))
            for j, d in enumerate((6, 4))
        ]
    ) / np.sqrt(4)
    phi, phiq = G @ P, Gq @ P
    want_d = phiq @ np.linalg.solve(phi.T @ phi + 0.1 * np.eye(4), phi.T)
    np.testing.assert_allclose(s1, want_d, rtol=1e-10, atol=1e-12)


def test_representation_similarity_is_numpy_cosine(x64):
    rng = np.random.default_rng(6)
    W = rng.normal(size=(3, 5))
    feats = lambda x: jnp.tanh(x @ jnp.asarray(W))  # noqa: E731
    x, xq = rng.normal(size=(7, 3)), rng.normal(size=(2, 3))
    x[3] = 0.0  # a zero feature vector: scores 0
    h, hq = np.tanh(x @ W), np.tanh(xq @ W)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = (hq @ h.T) / np.outer(np.linalg.norm(hq, axis=1), np.linalg.norm(h, axis=1))
    want[:, 3] = 0.0
    got = np.asarray(bl.representation_similarity(feats, jnp.asarray(xq), jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- errors


def test_clear_errors(x64):
    basis = {"fc": kfac.KronEigen(jnp.eye(3), jnp.ones(3), jnp.eye(2), jnp.ones(2))}
    g = {"fc": {"kernel": jnp.ones((4, 2, 2)), "bias": jnp.ones((4, 2))}}  # d_in + 1 = 3 rows
    lam = kfac.ekfac_eigenvalues(basis, g)
    assert lam["fc"].shape == (3, 2)
    with pytest.raises(ValueError, match="gradient of shape"):
        kfac.kfac_precondition(basis, {"fc": jnp.ones((4, 2, 2))}, 0.1)
    with pytest.raises(ValueError, match="eigenvalues of shape"):
        kfac.ekfac_influence(basis, {"fc": jnp.ones((2, 2))}, g, g, 0.1)
    with pytest.raises(KeyError, match="eigenvalues have no entry"):
        kfac.ekfac_influence(basis, {"other": jnp.ones((3, 2))}, g, g, 0.1)
    with pytest.raises(ValueError, match="rows"):  # gradients of another layer size
        kfac.kfac_influence(basis, {"fc": {"kernel": jnp.ones((4, 5, 2))}}, g, 0.1)
    with pytest.raises(ValueError, match="damping"):
        kfac.kfac_influence(basis, g, g, -1.0)
    zero = {"fc": kfac.KronEigen(jnp.eye(3), jnp.zeros(3), jnp.eye(2), jnp.ones(2))}
    with pytest.raises(ValueError, match="singular"):
        kfac.kfac_influence(zero, g, g, 0.0)
    with pytest.raises(ValueError, match="lam_in"):
        kfac.kfac_influence(
            {"fc": kfac.KronEigen(jnp.eye(3), jnp.ones(2), jnp.eye(2), jnp.ones(2))}, g, g
        )
    with pytest.raises(ValueError, match="square"):
        kfac.kfac_eigenbasis({"fc": lg.Covariances(jnp.ones((3, 2)), jnp.eye(2))})

    with pytest.raises(ValueError, match="same pytree structure"):
        bl.grad_dot({"a": jnp.ones((2, 3))}, {"b": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match="same parameters"):
        bl.grad_dot({"a": jnp.ones((2, 3))}, {"a": jnp.ones((2, 4))})
    with pytest.raises(ValueError, match="examples along axis 0"):
        bl.grad_dot(
            {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))},
            {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 3))},
        )
    with pytest.raises(ValueError, match="singular"):  # n = 3 < k = 5 at δ = 0
        bl.trak_scores(
            {"a": jnp.ones((1, 6))},
            {"a": jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)))},
            jax.random.key(0),
            k=5,
        )
    with pytest.raises(ValueError, match="k must be"):
        bl.trak_scores({"a": jnp.ones((1, 6))}, {"a": jnp.ones((3, 6))}, jax.random.key(0), k=0)
    with pytest.raises(ValueError, match="same feature function"):
        bl.representation_similarity(lambda z: z, jnp.ones((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="one vector per example"):
        bl.representation_similarity(lambda z: z.sum(axis=1), jnp.ones((2, 3)), jnp.ones((2, 3)))

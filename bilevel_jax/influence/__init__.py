r"""Data influence as hypergradients (``bj.influence``).

With per-example weights ``w`` as the meta parameters and a query loss ``f`` as the meta loss,
the library's hypergradient at ``w = 1`` is the influence of each training example on ``f``:

.. math::

    \mathrm{influence}(i, f) = g_f^\top (H + \delta I)^{-1} g_i
        = -n \, \frac{d f(\theta^*(w))}{d w_i}\Big|_{w = 1},

with ``L(θ; w) = (1/n) Σ_i w_i ℓ_i(θ) + R(θ)``, ``H = ∇²_θ L``, ``g_i = ∇ℓ_i(θ*)`` and
``g_f = ∇f(θ*)``. Positive: up-weighting example ``i`` lowers the query loss. Koh & Liang's
``I_up,loss`` is ``−influence``; the LoGra thesis' INFLUENCE (Choe, "Understanding Training Data in
Large-Scale Machine Learning", ch. 4) is ``influence``; gradient dot products (H = I) are
``g_fᵀ g_i``.

Modules (every name is also exported here):

- :mod:`~bilevel_jax.influence.exact` — ``influence`` (exact, any curvature: Hessian,
  Gauss–Newton, empirical Fisher, identity; dense or CG) and ``forward_influence`` (one solve and
  SAMA's central difference give the influence of every training example on one aggregate query);
- :mod:`~bilevel_jax.influence.logra` — LoGra's Kronecker-projected per-example gradients: the
  generic path (``vmap(grad)`` then ``P_inᵀ G P_out``) and the ``nnx.Linear`` adapter that never
  forms a full per-example gradient; random and KFAC-PCA bases;
- :mod:`~bilevel_jax.influence.kfac` — KFAC and EKFAC influence per linear layer (the
  Kronecker eigenbasis of the forward/backward covariances, EKFAC's corrected eigenvalues);
- :mod:`~bilevel_jax.influence.baselines` — gradient dot product, TRAK-style random projection,
  representation similarity;
- :mod:`~bilevel_jax.influence.store` — the resumable on-disk store of projected gradients;
- :mod:`~bilevel_jax.influence.pipeline` — ``log_gradients``: one compiled pass that streams the
  projected gradients to a store and accumulates the projected Fisher (resumable);
- :mod:`~bilevel_jax.influence.scoring` — the projected Fisher, damping after the fact, streamed
  block scoring (dot, influence, RelatIF, cosine, self-influence) and top-k;
- :mod:`~bilevel_jax.influence.evaluate` — the linear datamodeling score and brittleness masks.

>>> import jax.numpy as jnp, bilevel_jax as bj
>>> x, y = jnp.array([[1.0], [2.0], [3.0]]), jnp.array([1.0, 2.0, 2.0])
>>> loss = lambda th, b: 0.5 * (b[0] @ th - b[1]) ** 2          # per-example squared error
>>> theta = jnp.linalg.solve(x.T @ x, x.T @ y)                  # the trained model
>>> bj.influence.influence(loss, theta, (x, y), (x[:1], y[:1])).shape  # (queries, train)
(1, 3)
"""

from bilevel_jax.influence.baselines import grad_dot, representation_similarity, trak_scores
from bilevel_jax.influence.evaluate import (
    lds,
    retrain_on_masks,
    spearman,
    subset_masks,
    top_k_removal_masks,
)
from bilevel_jax.influence.exact import CURVATURES, forward_influence, influence
from bilevel_jax.influence.kfac import (
    KronEigen,
    ekfac_eigenvalues,
    ekfac_influence,
    kfac_eigenbasis,
    kfac_influence,
    kfac_precondition,
    layer_gradients,
)
from bilevel_jax.influence.logra import (
    Covariances,
    Projection,
    flatten_projected,
    kfac_covariances,
    logra_gradients,
    logra_linear,
    pca_projections,
    per_example_grads,
    project_gradients,
    random_projection,
    random_projections,
    with_logra,
)
from bilevel_jax.influence.pipeline import log_gradients
from bilevel_jax.influence.scoring import (
    FisherEigen,
    TopK,
    default_damping,
    fisher_eigh,
    precondition,
    projected_fisher,
    score_store,
    self_influence,
    top_k_influence,
)
from bilevel_jax.influence.store import (
    GradientStore,
    StoreCorruptError,
    StoreMismatchError,
    tree_checksum,
)

__all__ = [
    "trak_scores",
    "representation_similarity",
    "grad_dot",
    "layer_gradients",
    "kfac_precondition",
    "kfac_influence",
    "kfac_eigenbasis",
    "ekfac_influence",
    "ekfac_eigenvalues",
    "KronEigen",
    "CURVATURES",
    "Covariances",
    "FisherEigen",
    "GradientStore",
    "Projection",
    "StoreCorruptError",
    "StoreMismatchError",
    "TopK",
    "default_damping",
    "fisher_eigh",
    "flatten_projected",
    "forward_influence",
    "influence",
    "kfac_covariances",
    "lds",
    "logra_gradients",
    "log_gradients",
    "logra_linear",
    "pca_projections",
    "per_example_grads",
    "precondition",
    "project_gradients",
    "projected_fisher",
    "random_projection",
    "random_projections",
    "retrain_on_masks",
    "score_store",
    "self_influence",
    "spearman",
    "subset_masks",
    "top_k_influence",
    "top_k_removal_masks",
    "tree_checksum",
    "with_logra",
]

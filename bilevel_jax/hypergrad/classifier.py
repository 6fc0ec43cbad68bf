r"""The domain-classifier baseline of online data selection: λ is a logistic classifier.

Reference: D. Grangier, P. Ablin, A. Hannun, "Bilevel Optimization to Learn Training
Distributions for Language Modeling under Domain Shift", arXiv:2311.11973 (2023), the
domain-classifier baseline of Table 2.

**This is a baseline, not a hypergradient.** The scorer ``s(λ, x)`` that
:class:`~bilevel_jax.selection.Selection` uses to keep examples is trained to tell the
target domain from the generic one, not to lower the meta loss of the trained θ. In the meta
step the base batch ``B`` (``inputs.base_batch``: generic examples, label 0) and the meta
batch ``B'`` (``inputs.meta_batch``: target examples, label 1) are scored and the "meta
gradient" is the gradient of the balanced logistic loss

.. math::

    L_\text{clf}(\lambda) = \frac{1}{n}\sum_{i=1}^{n} \mathrm{softplus}\big(s(\lambda; B)_i\big)
    + \frac{1}{m}\sum_{j=1}^{m} \mathrm{softplus}\big(-s'(\lambda; B')_j\big),

:math:`\mathrm{softplus}(z) = \log(1 + e^z)`, i.e. the cross-entropy of
:math:`\sigma(s)`, the predicted probability that an example is from the target domain, with
each domain weighted 1/2 whatever the batch sizes. ``s' = meta_score_fn(λ, B')`` when the
meta batch has another layout than the generic one, else ``score_fn``. θ, the optimizer state
and the problem's ``base_loss``/``meta_loss`` are not used: swap ``method=bj.sama()`` for
``method=bj.domain_classifier(score_fn)`` in :func:`~bilevel_jax.bilevel_step` (with the same
``selection``) and every base step keeps the examples the classifier finds most target-like.

With ``Selection(meta_batch="selected")`` the generic examples of the meta step are the ones
the classifier already kept (the most target-like); ``meta_batch="random"`` or ``"big"``
gives it an unbiased sample of the generic data, as the baseline assumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from bilevel_jax.hypergrad.base import (
    BilevelInputs,
    BilevelProblem,
    Hypergrad,
    MethodBase,
    PyTree,
    all_finite,
)

__all__ = ["DomainClassifier", "domain_classifier"]


def _check_callable(fn: object, what: str) -> None:
    if not callable(fn):
        raise TypeError(
            f"domain_classifier: {what} must be a callable {what}(meta_params, batch) -> (n,) "
            f"scores (logits: the target domain is positive), got {fn!r}"
        )


def _scores(fn: Callable, meta_params: PyTree, batch: PyTree, what: str) -> jax.Array:
    """``fn(λ, batch)`` checked (at trace time) to be ``(n,)`` floating, in float32 or wider."""
    s = jnp.asarray(fn(meta_params, batch))
    if s.ndim != 1 or s.shape[0] == 0:
        raise ValueError(
            f"domain_classifier: {what} must return one score per example, shape (n,) with "
            f"n >= 1; got shape {s.shape}"
        )
    if not jnp.issubdtype(s.dtype, jnp.floating):
        raise ValueError(
            f"domain_classifier: {what} must return floating scores (logits), got dtype {s.dtype}"
        )
    return s.astype(jnp.promote_types(s.dtype, jnp.float32))


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class DomainClassifier(MethodBase):
    r"""Train the scorer λ as a generic-vs-target logistic classifier (see the module docstring).

    ``hypergrad`` returns ``meta_grad = ∇_λ L_clf(λ)``, ``meta_loss = L_clf(λ)``,
    ``base_update = None`` and ``info = {"accuracy": ...}``: the balanced accuracy
    ``(mean_i [s_i < 0] + mean_j [s'_j > 0]) / 2`` on the two batches. It keeps no state.

    Attributes:
      score_fn: ``score_fn(meta_params, batch) -> (n,)`` logits of the generic (base) batch;
        usually the ``score_fn`` of the :class:`~bilevel_jax.selection.Selection`.
      meta_score_fn: the same for the target (meta) batch; None: ``score_fn``.
      name: the method's name.

    Example:
      >>> import jax.numpy as jnp, optax, bilevel_jax as bj
      >>> def score(lam, x):
      ...     return x @ lam
      >>> m = DomainClassifier(score_fn=score)
      >>> m
      DomainClassifier(score_fn=score, meta_score_fn=None, name='domain_classifier')
      >>> loss = lambda th, lam, x: jnp.sum(th**2)  # not used by the method
      >>> problem = bj.BilevelProblem(loss, loss, optax.sgd(0.1))
      >>> generic, target = jnp.array([[-1.0, 0.0]]), jnp.array([[1.0, 0.0]])
      >>> inputs = bj.BilevelInputs(jnp.zeros(1), jnp.zeros(2), None, generic, target)
      >>> hg, _ = m.hypergrad(problem, inputs, m.init(None, None))
      >>> hg.meta_grad, float(hg.meta_loss) == 2 * float(jnp.log(2.0))  # σ(0) = 1/2 each
      (Array([-1.,  0.], dtype=float32), True)
    """

    score_fn: Callable[[PyTree, PyTree], jax.Array]
    meta_score_fn: Callable[[PyTree, PyTree], jax.Array] | None = None
    name: str = "domain_classifier"
    info_keys = ("accuracy",)
    own_objective = True
    """λ is trained on the method's own loss, not through ``base_loss``/``meta_loss`` (so
    :func:`~bilevel_jax.bilevel_step` does not warn when those losses do not read λ)."""

    def __post_init__(self) -> None:
        _check_callable(self.score_fn, "score_fn")
        if self.meta_score_fn is not None:
            _check_callable(self.meta_score_fn, "meta_score_fn")

    def init(self, base_params: PyTree, meta_params: PyTree) -> optax.EmptyState:
        """Stateless.

        >>> DomainClassifier(score_fn=lambda lam, x: x @ lam).init(None, None)
        EmptyState()
        """
        del base_params, meta_params
        return optax.EmptyState()

    def loss(
        self, meta_params: PyTree, base_batch: PyTree, meta_batch: PyTree
    ) -> tuple[jax.Array, jax.Array]:
        r"""``(L_clf(λ), balanced accuracy)``: generic ``base_batch`` label 0, ``meta_batch`` 1.

        >>> import jax.numpy as jnp
        >>> m = DomainClassifier(score_fn=lambda lam, x: x @ lam)
        >>> value, acc = m.loss(jnp.ones(1), jnp.array([[-2.0], [1.0]]), jnp.array([[3.0]]))
        >>> float(acc)  # generic: one of two right; target: right
        0.75
        """
        meta_fn = self.score_fn if self.meta_score_fn is None else self.meta_score_fn
        s = _scores(self.score_fn, meta_params, base_batch, "score_fn")
        meta_what = "score_fn" if self.meta_score_fn is None else "meta_score_fn"
        t = _scores(meta_fn, meta_params, meta_batch, meta_what)
        value = jnp.mean(jax.nn.softplus(s)) + jnp.mean(jax.nn.softplus(-t))
        accuracy = 0.5 * (jnp.mean(s < 0) + jnp.mean(t > 0))
        return value, jax.lax.stop_gradient(accuracy)

    def hypergrad(
        self, problem: BilevelProblem, inputs: BilevelInputs, state: PyTree
    ) -> tuple[Hypergrad, PyTree]:
        """``∇_λ L_clf`` on ``inputs.base_batch`` (label 0) and ``inputs.meta_batch`` (label 1).

        ``problem``, θ and the optimizer states are not used.

        >>> import jax.numpy as jnp
        >>> m = domain_classifier(lambda lam, x: x @ lam)
        >>> inputs = BilevelInputs(None, jnp.zeros(1), None, jnp.ones((3, 1)), jnp.ones((2, 1)))
        >>> hg, _ = m.hypergrad(None, inputs, m.init(None, None))  # the same data in both
        >>> float(hg.meta_grad[0]), float(hg.info["accuracy"]), hg.base_update
        (0.0, 0.0, None)
        """
        del problem
        (value, accuracy), grad = jax.value_and_grad(self.loss, has_aux=True)(
            inputs.meta_params, inputs.base_batch, inputs.meta_batch
        )
        hg = Hypergrad(
            meta_grad=grad,
            base_update=None,
            meta_loss=value,
            finite=all_finite(grad),
            info={"accuracy": accuracy},
        )
        return hg, state


def domain_classifier(
    score_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    meta_score_fn: Callable[[PyTree, PyTree], jax.Array] | None = None,
) -> DomainClassifier:
    r"""The domain-classifier baseline (Grangier et al. 2023): λ learns generic (0) vs target (1).

    The "meta gradient" is :math:`\nabla_\lambda` of the balanced logistic loss
    :math:`\mathrm{mean}_i\,\mathrm{softplus}(s(\lambda; B)_i) +
    \mathrm{mean}_j\,\mathrm{softplus}(-s'(\lambda; B')_j)` of the meta step's base batch
    ``B`` and meta batch ``B'``; θ and the problem's losses are ignored (a baseline, not a
    hypergradient; see :mod:`bilevel_jax.hypergrad.classifier`).

    Args:
      score_fn: ``score_fn(meta_params, batch) -> (n,)`` logits, the selection's scorer.
      meta_score_fn: the scorer of the target batch when it differs; default ``score_fn``.

    Returns:
      A :class:`DomainClassifier`.

    Example — the same selection as with a hypergradient method, λ trained as a classifier:

      >>> import jax, jax.numpy as jnp, optax, bilevel_jax as bj
      >>> score = lambda lam, x: x @ lam
      >>> per_example = lambda th, x: (x @ th - 1.0) ** 2
      >>> weighted = lambda th, lam, x: jnp.sum(  # the meta step's base loss (unused here)
      ...     bj.selection.softmax_weights(score(lam, x)) * per_example(th, x))
      >>> step = bj.bilevel_step(
      ...     weighted, lambda th, lam, x: jnp.mean(per_example(th, x)),
      ...     optax.sgd(0.1), optax.sgd(1.0), bj.domain_classifier(score),
      ...     selection=bj.Selection(score_fn=score, keep=2, meta_batch="big"),
      ...     train_loss=lambda th, x: jnp.mean(per_example(th, x)))
      >>> generic = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 2)) - 1.0
      >>> target = jax.random.normal(jax.random.PRNGKey(1), (8, 2)) + 1.0
      >>> state, metrics = step(step.init(jnp.zeros(2), jnp.zeros(2)), generic, target)
      >>> bool(jnp.all(state.meta_params > 0)), sorted(metrics)[:2]  # λ points to the target
      (True, ['accuracy', 'base_loss'])
    """
    return DomainClassifier(score_fn=score_fn, meta_score_fn=meta_score_fn)

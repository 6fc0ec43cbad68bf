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

>>> import bilevel_jax as bj
>>> bj.influence.__name__
'bilevel_jax.influence'
"""

"""Deprecated alias of :mod:`bilevel_jax.nnx` (``bj.nnx``); importing it warns.

Example:
  >>> import warnings
  >>> with warnings.catch_warnings():
  ...     warnings.simplefilter("ignore", DeprecationWarning)
  ...     from bilevel_jax import nnx_utils
  >>> import bilevel_jax as bj
  >>> nnx_utils.split_params is bj.nnx.split_params
  True
"""

import warnings

from bilevel_jax.nnx import apply, merge, split_params

__all__ = ["split_params", "merge", "apply"]

warnings.warn(
    "bilevel_jax.nnx_utils is deprecated; use bilevel_jax.nnx (bj.nnx)",
    DeprecationWarning,
    stacklevel=2,
)

"""Runnable studies on real data for bilevel_jax (not part of the library package)."""

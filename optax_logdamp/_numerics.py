"""Shared numerics of the transforms: per-tensor sums of squares and the global norm.

Both :mod:`optax_logdamp._alrc` (the gradient-norm signal) and
:mod:`optax_logdamp._dampening` (the automatic knee) reduce each tensor to its sum of
squares; they take it from here, so that the two agree to the bit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def sum_of_squares(g: jax.Array) -> jax.Array:
    """The sum of ``|g|**2`` over a tensor, in float32 (float64 stays float64).

    Half-precision gradients are widened first, so they neither overflow nor lose their
    small elements. A plain reduction: it works under every sharding, explicit meshes
    included.
    """
    g = jnp.asarray(g)
    if jnp.issubdtype(g.dtype, jnp.complexfloating):
        g = jnp.abs(g)
    return jnp.sum(jnp.square(g.astype(jnp.promote_types(g.dtype, jnp.float32))))


def global_norm(updates: Any) -> jax.Array:
    """The L2 norm of every element of ``updates`` (of the modulus for complex), float32.

    Each leaf's sum of squares is taken by :func:`sum_of_squares`.
    """
    return norm_of_sums([sum_of_squares(g) for g in jax.tree.leaves(updates)])


def norm_of_sums(sums: list[jax.Array]) -> jax.Array:
    """The global norm from the leaves' sums of squares (as :func:`global_norm` adds them)."""
    total = sum(sums, jnp.zeros([], jnp.float32))
    return jnp.sqrt(total).astype(jnp.float32)

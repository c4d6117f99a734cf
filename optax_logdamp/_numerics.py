"""Shared numerics of the transforms: sums of squares and the global norm.

The gradient-norm signal (:mod:`optax_logdamp._statistics`) and the automatic knee
(:mod:`optax_logdamp._dampening`) reduce tensors to sums of squares; they take them
from here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_logdamp import _grouping as grouping


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

    Sums of squares are taken by :func:`sum_of_squares`. Where
    :func:`~optax_logdamp._grouping.enabled` (one CPU device), the small tensors are
    flattened into one vector and reduced at once: one reduction to compile instead of
    one per tensor; large tensors keep their own.
    """
    leaves = jax.tree.leaves(updates)
    if not grouping.enabled():
        return norm_of_sums([sum_of_squares(g) for g in leaves])
    small = [g for g in leaves if g.size <= grouping.MAX_GROUPED_SIZE]
    sums = [sum_of_squares(g) for g in leaves if g.size > grouping.MAX_GROUPED_SIZE]
    if small:
        # Concatenation promotes to the widest dtype; sum_of_squares widens from there.
        sums.append(sum_of_squares(jnp.concatenate([jnp.ravel(g) for g in small])))
    return norm_of_sums(sums)


def norm_of_sums(sums: list[jax.Array]) -> jax.Array:
    """The global norm from the leaves' sums of squares (as :func:`global_norm` adds them)."""
    total = sum(sums, jnp.zeros([], jnp.float32))
    return jnp.sqrt(total).astype(jnp.float32)

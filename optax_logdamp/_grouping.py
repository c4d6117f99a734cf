"""One copy of the elementwise kernel for many small tensors of one kind, not one per tensor.

Why this module exists: XLA fuses the dampening kernel into every tensor's Adam moment
updates (it is built for that, see :mod:`optax_logdamp._log1p_kernel`), twice per tensor,
so a model of a few hundred tensors compiles it a few hundred times; on CPU each copy
costs milliseconds of compile time, more than Adam's own arithmetic, and the automatic
knee adds its statistics per tensor. Where at least :data:`MIN_GROUP_SIZE` small tensors
share a shape, dtype and sharding they are stacked instead, and one ``lax.map`` over the
stack traces and compiles the kernel (and the knee's statistics) once; the gradient norm
of all small tensors is one reduction over their concatenation
(:func:`optax_logdamp._numerics.global_norm`).

Measured (``benchmarks/results/cost/``, 2 CPU cores): the optimizer step alone at 300
tensors of (64, 64) compiles in 2.1 s instead of 5.6 s (``logadam``), 2.9 s instead of
7.1 s (``logadam(dampen_scale="auto")``) and 1.8 s instead of 2.7 s (``spike_guard()``
+ Adam). Where few tensors share a shape a ``lax.map`` does not pay: over the 2-layer
GPT's 10 vectors of (96,), its training step with ``logadam(dampen_scale="auto")``
compiled in 1.80 s against 1.62 s apart (``whole_step.py --per-tensor`` with groups from 4
tensors, smallest of 3 compiles), hence :data:`MIN_GROUP_SIZE`.

Grouping is on for a single CPU device only (:func:`enabled`), and for tensors of at most
:data:`MAX_GROUPED_SIZE` elements: there compile time dominates and the stacking copy
costs nothing measurable, while a large tensor keeps the kernel fused into Adam's moment
updates, its fastest step. A group holds about :data:`GROUP_SIZE` tensors: XLA:CPU
compiles a fusion that reads one slice of a stack more slowly the more slices the stack
has, so a few short stacks compile faster than one long one. The arithmetic per element
is the same either way: the dampened updates are bitwise those of the tensor-by-tensor
path, the knee's statistics equal to float32 rounding (``tests/test_grouping.py``).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

GROUP_SIZE = 16
"""The most tensors one ``lax.map`` covers (measured best of 4, 8, 16 and 32)."""

MIN_GROUP_SIZE = 12
"""The fewest tensors of one kind that are grouped: a ``lax.map`` over fewer compiles
more slowly than their separate kernels (measured on the LM benchmark's 10 vectors)."""

MAX_GROUPED_SIZE = 2**16
"""The largest tensor (in elements) that is grouped; a larger one keeps its fused kernel."""


def enabled() -> bool:
    """Whether :func:`map_leaves` groups: on a single CPU device only.

    Compile time per kernel copy is the CPU's problem, measured there. Elsewhere each
    tensor keeps its own fused kernel: on a GPU a loop iteration has a launch cost of
    its own, and across devices a stack of tensors sharded in different ways would be
    resharded (under explicit sharding :func:`groups_of` never mixes them, but under
    automatic sharding their layouts are not known while tracing).
    """
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _kind(x: jax.Array) -> tuple[Any, ...]:
    """What tensors must share to be stacked: shape, dtype, weak type and sharding.

    The sharding is that of the abstract value (explicit sharding; otherwise empty), so
    that a stack never mixes two explicitly sharded layouts.
    """
    aval = jax.typeof(x)
    return (aval.shape, aval.dtype, aval.weak_type, getattr(aval, "sharding", None))


def groups_of(leaves: Sequence[jax.Array]) -> list[list[int]]:
    """Indices of ``leaves`` in groups: small tensors of one kind together, in order.

    Every leaf is in exactly one group; a group of small tensors of one kind holds at
    least :data:`MIN_GROUP_SIZE` of them (about :data:`GROUP_SIZE`, at most
    ``2 * MIN_GROUP_SIZE - 1``), and any other leaf is a group of its own.
    """
    by_kind: dict[Any, list[int]] = collections.defaultdict(list)
    groups: list[list[int]] = []
    for index, leaf in enumerate(leaves):
        if 0 < leaf.size <= MAX_GROUPED_SIZE:
            by_kind[_kind(leaf)].append(index)
        else:
            groups.append([index])
    for indices in by_kind.values():
        if len(indices) < MIN_GROUP_SIZE:
            groups.extend([index] for index in indices)
            continue
        # Groups of about GROUP_SIZE, split evenly, none below MIN_GROUP_SIZE.
        count = min(-(-len(indices) // GROUP_SIZE), len(indices) // MIN_GROUP_SIZE)
        bounds = [len(indices) * i // count for i in range(count + 1)]
        groups.extend(indices[a:b] for a, b in itertools.pairwise(bounds))
    return groups


def map_leaves(
    fn: Callable[..., Any], *columns: Sequence[jax.Array], shared: Sequence[Any] = ()
) -> list[Any]:
    """``[fn(*row, *shared) for row in zip(*columns)]``, one call per group of tensors.

    ``columns[0]`` are the tensors (they choose the groups, :func:`groups_of`); each other
    column holds one array per tensor (a knee's statistic, say) that ``fn`` takes along,
    and ``shared`` are arguments of every call (a step's weight). ``fn`` returns an array
    or a tuple of arrays per tensor. Element by element the result is that of the tensor
    alone; a reduction inside ``fn`` may sum in another order (to within rounding).

    Give a jitted ``fn``, made once (at module level, not a closure per step): tensors of
    one shape and dtype then share one trace and one lowering (XLA inlines the call: the
    compiled program is the same), and calls outside ``jit`` reuse its compiled kernel.
    Measured on the 2-layer GPT's training step with ``logadam(dampen_scale="auto")``:
    its compile went from 1.59x to 1.41x that of ``optax.adam``
    (``benchmarks/whole_step.py``).
    """
    tensors = columns[0]
    out: list[Any] = [None] * len(tensors)
    groups = groups_of(tensors) if enabled() else [[i] for i in range(len(tensors))]
    for group in groups:
        if len(group) == 1:
            (index,) = group
            out[index] = fn(*(column[index] for column in columns), *shared)
            continue
        stacked = tuple(jnp.stack([column[i] for i in group]) for column in columns)
        mapped = lax.map(lambda row: fn(*row, *shared), stacked)
        for position, index in enumerate(group):
            out[index] = jax.tree.map(lambda x, p=position: x[p], mapped)
    return out

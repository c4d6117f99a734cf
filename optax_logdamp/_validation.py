"""Checks of hyperparameters at construction time, and of how a transform is called.

Hyperparameters may arrive as traced arrays (``optax.inject_hyperparams``
re-calls a factory inside ``update``); those cannot be inspected, so the value
checks here run only on concrete values and let tracers through (dtypes are
checked either way).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np


def is_concrete(value: Any) -> bool:
    """True when ``value`` is a Python number or a concrete (non-traced) array."""
    return not isinstance(value, jax.core.Tracer)


def as_float(value: Any) -> float | None:
    """The value as a Python float, or ``None`` if it is traced or not a scalar."""
    if not is_concrete(value):
        return None
    array = np.asarray(value)
    if array.ndim != 0:
        return None
    return float(array)


def check_scalar(name: str, value: Any) -> None:
    """Refuses a concrete hyperparameter that is not a real scalar."""
    if not is_concrete(value):
        return
    array = np.asarray(value)
    if array.ndim != 0 or not (
        jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)
    ):
        raise ValueError(f"{name} must be a real scalar, got {value!r}.")


def check_positive(name: str, value: Any) -> None:
    """Refuses a concrete hyperparameter that is not a finite number > 0."""
    check_scalar(name, value)
    number = as_float(value)
    if number is not None and not (0.0 < number < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


HALF_PRECISION_HINT = (
    "Under optax.inject_hyperparams with bfloat16 or float16 parameters the "
    "hyperparameters take the parameters' dtype, where 0.999 rounds to 1 (bfloat16) and "
    "1e-8 to 0 (float16): pass hyperparam_dtype=jnp.float32."
)


def check_not_half_precision(name: str, value: Any) -> None:
    """Refuses a hyperparameter held in bfloat16 or float16, concrete or traced.

    Decay rates and epsilons lose their meaning there (0.999 becomes 1: Adam divides by
    zero, ALRC's averages stop), and a traced value cannot be checked, so the dtype is
    refused whatever the value: the only check that also works under ``jit``.
    """
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(
            f"{name} must be float32 or wider, got dtype {dtype}. {HALF_PRECISION_HINT}"
        )


def check_decay_rate(name: str, value: Any) -> None:
    """Refuses an exponential decay rate outside ``[0, 1)`` or in half precision."""
    check_scalar(name, value)
    check_not_half_precision(name, value)
    number = as_float(value)
    if number is not None and not (0.0 <= number < 1.0):
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}.")


def check_open_unit_interval(name: str, value: Any, hint: str = "") -> None:
    """Refuses a concrete hyperparameter outside the open interval (0, 1)."""
    check_scalar(name, value)
    number = as_float(value)
    if number is not None and not (0.0 < number < 1.0):
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}. {hint}".strip())


def missing_value_error(transform: str) -> TypeError:
    """The error for a transform that needs the loss as ``value`` and did not get it.

    Flax Linen's own ``TrainState.apply_gradients`` is the usual cause: it calls
    ``tx.update`` without extra arguments even when given ``value=loss``, so the
    message names the fix for it, and NNX's spelling.
    """
    return TypeError(
        f"{transform} needs the loss of this step. Pass it as the keyword argument "
        "`value`: `updates, opt_state = tx.update(grads, opt_state, params, value=loss)`. "
        "Flax Linen: `flax.training.train_state.TrainState.apply_gradients` drops `value` "
        "(even when given), use `optax_logdamp.flax.TrainState`, a drop-in subclass that "
        "passes it on. Flax NNX: `optimizer.update(model, grads, value=loss)`."
    )


def _brief(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters, for a tree structure inside an error message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key_paths(tree: Any) -> list[str]:
    """The key path of every leaf of ``tree``, as ``['w']`` or ``.mu['w']``."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _structure_difference(name_a: str, tree_a: Any, name_b: str, tree_b: Any) -> str:
    """The two structures, briefly, and up to three leaves that only one of them has."""
    text = (
        f"{name_a} has structure {_brief(str(jax.tree.structure(tree_a)))}, "
        f"{name_b} has {_brief(str(jax.tree.structure(tree_b)))}."
    )
    paths_a, paths_b = _key_paths(tree_a), _key_paths(tree_b)
    for name, paths, others in ((name_a, paths_a, paths_b), (name_b, paths_b, paths_a)):
        only = [path for path in paths if path not in set(others)]
        if only:
            more = f" and {len(only) - 3} more" if len(only) > 3 else ""
            text += f" Only in {name}: {', '.join(only[:3])}{more}."
    return text


def check_trees_match(
    transform: str, name_a: str, tree_a: Any, name_b: str, tree_b: Any, *, problem: str, fix: str
) -> None:
    """Refuses two trees of different structures, showing both and what only one has."""
    if jax.tree.structure(tree_a) != jax.tree.structure(tree_b):
        raise ValueError(
            f"{transform}: {problem} ({fix}). "
            + _structure_difference(name_a, tree_a, name_b, tree_b)
        )


def check_params_match(transform: str, updates: Any, params: Any) -> None:
    """Refuses ``params`` whose tree structure or leaf shapes differ from those of ``updates``.

    ``params`` is optional in Optax (``None`` passes); when given it must be the tree the
    updates apply to. Runs at trace time (structures and shapes are static).
    """
    if params is None:
        return
    check_trees_match(
        transform,
        "updates",
        updates,
        "params",
        params,
        problem="params must have the tree structure of updates",
        fix="params are the parameters the updates apply to, e.g. the trainable leaves only: "
        "eqx.filter(model, eqx.is_array) for Equinox",
    )
    update_leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
    for (path, update), param in zip(update_leaves, jax.tree.leaves(params), strict=True):
        if jnp.shape(update) != jnp.shape(param):
            key = jax.tree_util.keystr(path)
            raise ValueError(
                f"{transform}: params must have the shapes of updates; updates{key} has shape "
                f"{jnp.shape(update)}, params{key} has shape {jnp.shape(param)}."
            )


def check_state_type(transform: str, state: Any, expected: type) -> None:
    """Refuses a ``state`` that is not the ``expected`` type, the one ``init`` returns.

    A state from elsewhere (``None``, ``optax.EmptyState()``, another transform's state)
    would otherwise fail deep inside ``update`` with an ``AttributeError``. Runs in
    Python, once per trace under ``jit``.
    """
    if type(state) is expected:
        return
    hint = ""
    if isinstance(state, dict):
        hint = (
            " A checkpoint restored without a target comes back as dicts: restore it into "
            "the structure of tx.init(params) (orbax: an abstract target; "
            "flax.serialization.from_bytes: a template)."
        )
    elif type(state) in (tuple, list):
        hint = (
            " A tuple is the state of an optax.chain: call update on the chain, which hands "
            "each transform its own part."
        )
    raise TypeError(
        f"{transform}: state must be the {expected.__name__} that this transform's init "
        f"returns, got {'None' if state is None else type(state).__name__}. Create it with "
        "opt_state = tx.init(params), and pass on the state that each tx.update returns." + hint
    )


def loss_array(transform: str, value: Any) -> jax.Array:
    """The ``value`` extra argument (the loss) as an array; refuses what is not a real loss."""
    if value is None:
        raise missing_value_error(transform)
    try:
        loss = jnp.asarray(value)
    except TypeError:
        loss = None
    if loss is None or not (
        jnp.issubdtype(loss.dtype, jnp.floating) or jnp.issubdtype(loss.dtype, jnp.integer)
    ):
        got = f"dtype {loss.dtype}" if loss is not None else f"{type(value).__name__} {value!r:.40}"
        raise TypeError(
            f"{transform}: value must be a real loss, a number or an array of them (the loss "
            "that jax.value_and_grad returns: tx.update(grads, opt_state, params, value=loss)), "
            f"got {got}."
        )
    return loss


def check_inexact_leaves(transform: str, updates: Any) -> None:
    """Refuses updates with a leaf that is not floating-point or complex, naming the leaf.

    Runs at trace time (dtypes are static), so it costs nothing under ``jit``.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{transform} expects floating-point or complex updates; the leaf "
                f"updates{jax.tree_util.keystr(path)} has dtype {dtype}. Parameters that are "
                "not trained (integer counters, buffers) can be left out of the optimizer with "
                "optax.masked or optax.multi_transform."
            )

"""Checks of hyperparameters at construction time.

Hyperparameters may arrive as traced arrays (``optax.inject_hyperparams``
re-calls a factory inside ``update``); those cannot be inspected, so every check
here runs only on concrete values and lets tracers through.
"""

from __future__ import annotations

from typing import Any

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


def check_open_unit_interval(name: str, value: Any, hint: str = "") -> None:
    """Refuses a concrete hyperparameter outside the open interval (0, 1)."""
    check_scalar(name, value)
    number = as_float(value)
    if number is not None and not (0.0 < number < 1.0):
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}. {hint}".strip())

"""Diagnostics for logging: the ALRC statistics of an optimizer state as scalars."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_logdamp._alrc import ALRCState, find_alrc_states, signal_of
from optax_logdamp._validation import is_concrete


def _path_name(path: tuple[Any, ...]) -> str:
    """A path in a tree as ``a/b/0``: attribute names, dict keys and indices."""
    parts = []
    for key in path:
        for attribute in ("name", "key", "idx"):  # GetAttrKey, DictKey, SequenceKey
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _state_diagnostics(state: ALRCState) -> dict[str, jax.Array]:
    """The loggable scalars of one :class:`ALRCState`."""
    field = {name: jnp.asarray(value) for name, value in state._asdict().items()}
    num_losses = field["num_losses"]
    clip_rate = jnp.where(
        num_losses > 0,
        field["num_clipped"].astype(jnp.float32) / jnp.maximum(num_losses, 1),
        0.0,
    )
    return {
        "threshold": field["threshold"],
        "scale": field["scale"],
        "num_clipped": field["num_clipped"],
        "clip_rate": clip_rate.astype(jnp.float32),
        "mean": field["mean"],
        "std": jnp.sqrt(jnp.maximum(field["var"], 0.0)),
        "num_steps": field["num_steps"],
        "num_nonfinite": field["num_nonfinite"],
    }


def alrc_diagnostics(opt_state: Any) -> dict[str, jax.Array]:
    r"""Finds every ALRC state in an optimizer state and returns its statistics as scalars.

    The states are found anywhere in the tree (a chain, ``inject_hyperparams``,
    ``MultiSteps``, ``masked``, a Flax ``TrainState.opt_state`` or an
    ``nnx.Optimizer.opt_state``). Each gives ``threshold``, ``scale`` (the last step's
    factor), ``num_clipped``, ``mean``, ``num_steps``, ``num_nonfinite`` and

    .. math::
      \mathrm{clip\_rate} = \frac{\mathrm{num\_clipped}}{\max(1, \mathrm{num\_losses})},
      \qquad \mathrm{std} = \sqrt{\max(0, \mathrm{var})}.

    Those of the gradient norm are prefixed ``grad_norm/``; several states of one signal
    are prefixed by their paths in the tree instead. Works inside ``jit`` and outside;
    without ALRC the dict is empty, so a run whose configuration switches the defence
    off logs nothing. Names and what to watch: :doc:`the guide </guide/diagnostics>`.

    Args:
      opt_state: an optimizer state, or any tree that holds ALRC states.

    Returns:
      A flat ``dict`` from names to scalar arrays (empty if the tree holds no
      :class:`~optax_logdamp.ALRCState`).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from optax_logdamp import alrc, alrc_diagnostics, logadam, to_python_numbers
      >>> tx = optax.chain(alrc(), logadam(1e-3))
      >>> params = jnp.zeros(3)
      >>> opt_state = tx.init(params)
      >>> _, opt_state = tx.update(jnp.ones(3), opt_state, params, value=2.0)
      >>> to_python_numbers(alrc_diagnostics(opt_state))
      {'threshold': 8.0, 'scale': 1.0, 'num_clipped': 0, 'clip_rate': 0.0, 'mean': 2.0,
       'std': 0.0, 'num_steps': 1, 'num_nonfinite': 0}

    References:
      J. M. Ede and R. Beanland, `Adaptive Learning Rate Clipping Stabilizes
      Learning <https://arxiv.org/abs/1906.09060>`_, 2020.
    """
    found = find_alrc_states(opt_state)
    prefixes = ["" if signal_of(path) == "loss" else f"{signal_of(path)}/" for path, _ in found]
    if len(set(prefixes)) < len(prefixes):
        prefixes = [f"{_path_name(path)}/" for path, _ in found]
    diagnostics = {}
    for prefix, (_, state) in zip(prefixes, found, strict=True):
        for name, value in _state_diagnostics(state).items():
            diagnostics[prefix + name] = value
    return diagnostics


def to_python_numbers(diagnostics: dict[str, Any]) -> dict[str, int | float]:
    """Scalar arrays as Python numbers for a logger: integers as ``int``, floats exactly.

    A float32 value becomes the shortest decimal that reads back as the same float32:
    a clip rate of 1/100 is ``0.01``, where ``float()`` would give its float64
    expansion ``0.009999999776482582``; counters stay integers (``8``, not ``8.0``).
    Call it outside ``jit``, on the dict that :func:`alrc_diagnostics` returned.

    Args:
      diagnostics: names to scalars (arrays or numbers), such as
        :func:`alrc_diagnostics` returns.

    Returns:
      A ``dict`` with the same keys and ``int`` or ``float`` values.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_logdamp import to_python_numbers
      >>> to_python_numbers({"clip_rate": jnp.float32(1 / 100), "num_clipped": jnp.int32(8)})
      {'clip_rate': 0.01, 'num_clipped': 8}
    """
    numbers: dict[str, int | float] = {}
    for name, value in diagnostics.items():
        if not is_concrete(value):
            raise TypeError(
                f"to_python_numbers: {name!r} is a traced value: this runs inside jax.jit (or "
                "another JAX transformation), where values are not known yet. Call it outside "
                "jit, on the returned state: return opt_state (or alrc_diagnostics(opt_state)) "
                "from the jitted step, then to_python_numbers(alrc_diagnostics(opt_state))."
            )
        array = np.asarray(value)
        if array.ndim != 0:
            raise ValueError(f"to_python_numbers: {name!r} is not a scalar (shape {array.shape}).")
        if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
            numbers[name] = int(array)
        elif array.dtype.itemsize < 8:  # float32 or narrower: the shortest exact decimal
            numbers[name] = float(str(array[()]))
        else:
            numbers[name] = float(array)
    return numbers

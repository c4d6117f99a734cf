"""Diagnostics for logging: how often the defences in an optimizer state acted."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_logdamp._dampening import LogDampenState, auto_knee, has_knee
from optax_logdamp._statistics import ALRCState, find_alrc_states, signal_of
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


def diagnostics(opt_state: Any, grads: Any = None) -> dict[str, jax.Array]:
    r"""How often the defences in an optimizer state acted, as scalars to log.

    Every ALRC statistic (:func:`spike_guard`, :func:`alrc`, :func:`alrc_per_example`) is
    found anywhere in the tree (a chain, ``inject_hyperparams``, ``MultiSteps``,
    ``masked``, a Flax ``TrainState.opt_state`` or an ``nnx.Optimizer.opt_state``) and
    gives: ``num_clipped``, the steps (examples for :func:`alrc_per_example`) capped so
    far; ``num_nonfinite``, the steps skipped because a statistic was not finite;
    ``scale``, the last step's factor; ``threshold``, ``mean``, ``std`` and
    ``num_steps``; and

    .. math::
      \mathrm{clip\_rate} = \frac{\mathrm{num\_clipped}}{\max(1, \mathrm{num\_losses})}.

    Those of the gradient norm (:func:`spike_guard`'s) are prefixed ``grad_norm/``;
    several states of one signal are prefixed by their paths in the tree instead.

    With ``grads``, the gradients given to ``update`` with this ``opt_state``, the
    automatic knee of :func:`log_dampen` (``"auto"``, as in
    ``logadam(dampen_scale="auto")``) adds ``dampen/bent_fraction``, the fraction of
    the elements above their tensor's knee, which the dampening bends, and
    ``dampen/tensors_bent``, how many tensors have one. Computing them reads every
    gradient once more, so they cost only when asked for.

    Works inside ``jit`` and outside; a state without a defence gives an empty dict.
    Names and what to watch: :doc:`the guide </guide/diagnostics>`.

    Args:
      opt_state: an optimizer state, or any tree that holds the defences' states.
      grads: optional, the gradients of this step, before ``update``.

    Returns:
      A flat ``dict`` from names to scalar arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from optax_logdamp import diagnostics, spike_guard, to_python_numbers
      >>> tx = optax.chain(spike_guard(), optax.adam(1e-3))
      >>> params = jnp.zeros(3)
      >>> opt_state = tx.init(params)
      >>> _, opt_state = tx.update(jnp.ones(3), opt_state, params)
      >>> numbers = to_python_numbers(diagnostics(opt_state))
      >>> numbers["grad_norm/num_clipped"], numbers["grad_norm/num_nonfinite"]
      (0, 0)
    """
    found = find_alrc_states(opt_state)
    prefixes = ["" if signal_of(path) == "loss" else f"{signal_of(path)}/" for path, _ in found]
    if len(set(prefixes)) < len(prefixes):
        prefixes = [f"{_path_name(path)}/" for path, _ in found]
    numbers = {}
    for prefix, (_, state) in zip(prefixes, found, strict=True):
        for name, value in _state_diagnostics(state).items():
            numbers[prefix + name] = value
    if grads is not None:
        numbers.update(_dampening_diagnostics(opt_state, grads))
    return numbers


def _dampening_diagnostics(opt_state: Any, grads: Any) -> dict[str, jax.Array]:
    """``dampen/bent_fraction`` and ``dampen/tensors_bent`` of the first automatic knee."""
    is_knees = lambda node: isinstance(node, LogDampenState)  # noqa: E731
    knees = [node for node in jax.tree.leaves(opt_state, is_leaf=is_knees) if is_knees(node)]
    if not knees:
        return {}
    state = knees[0]
    leaves, treedef = jax.tree.flatten(grads)
    log_mean_squares = treedef.flatten_up_to(state.log_mean_square)
    bent, total, tensors = jnp.zeros([], jnp.float32), 0, jnp.zeros([], jnp.int32)
    for g, log_mean_square in zip(leaves, log_mean_squares, strict=True):
        knee = auto_knee(log_mean_square)
        above = jnp.sum(jnp.abs(g) > knee.astype(jnp.result_type(g)), dtype=jnp.int32)
        above = jnp.where(has_knee(log_mean_square), above, 0)  # no knee: passed unchanged
        bent = bent + above.astype(jnp.float32)
        tensors = tensors + (above > 0).astype(jnp.int32)
        total += g.size
    return {"dampen/bent_fraction": bent / max(total, 1), "dampen/tensors_bent": tensors}


def to_python_numbers(diagnostics: dict[str, Any]) -> dict[str, int | float]:
    """Scalar arrays as Python numbers for a logger: integers as ``int``, floats exactly.

    A float32 value becomes the shortest decimal that reads back as the same float32:
    a clip rate of 1/100 is ``0.01``, where ``float()`` would give its float64
    expansion ``0.009999999776482582``; counters stay integers (``8``, not ``8.0``).
    Call it outside ``jit``, on the dict that :func:`diagnostics` returned.

    Args:
      diagnostics: names to scalars (arrays or numbers), such as
        :func:`diagnostics` returns.

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
                "jit, on the returned state: return opt_state (or diagnostics(opt_state)) "
                "from the jitted step, then to_python_numbers(diagnostics(opt_state))."
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

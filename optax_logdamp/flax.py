"""Flax Linen glue: a ``TrainState`` that hands the loss to the optimizer.

Flax's :class:`flax.training.train_state.TrainState` calls ``tx.update(grads,
opt_state, params)`` with no extra arguments, so :func:`optax_logdamp.alrc` never
sees the loss. :class:`TrainState` here is a drop-in subclass whose
``apply_gradients`` forwards ``value=`` and any other keyword that is not a field of
the state to ``tx.update``.

Flax NNX needs no glue: ``nnx.Optimizer.update(model, grads, value=loss)`` already
forwards keyword arguments to ``tx.update``.

This module imports Flax (``pip install "optax_logdamp[flax]"``); the core package
does not.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import optax

try:
    from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
    from flax.training import train_state
except ModuleNotFoundError as _error:  # Flax is an optional dependency
    if _error.name is None or _error.name.split(".")[0] != "flax":
        raise  # Flax is there but something it imports is not: the original error says what
    raise ModuleNotFoundError(
        'optax_logdamp.flax needs Flax, which is not installed: pip install "optax_logdamp[flax]" '
        "(or pip install flax). The core package (import optax_logdamp) works without it.",
        name=_error.name,
    ) from _error


def _takes_extra_args(tx: optax.GradientTransformation) -> bool:
    """Whether ``tx.update`` accepts keyword arguments beyond ``params``.

    True for :class:`optax.GradientTransformationExtraArgs` and for objects whose
    ``update`` takes ``**kwargs``, such as :class:`optax.MultiSteps` and its
    ``gradient_transformation()`` (a plain ``GradientTransformation`` that does).
    """
    if isinstance(tx, optax.GradientTransformationExtraArgs):
        return True
    try:
        parameters = inspect.signature(tx.update).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass the arguments on
        return True
    return any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)


class TrainState(train_state.TrainState):
    """Flax Linen ``TrainState`` whose ``apply_gradients`` forwards the loss to ``tx``.

    Everything else is Flax's: ``create``, ``replace``, the ``step`` counter,
    subclassing with extra fields, the fp8 ``OVERWRITE_WITH_GRADIENT`` collection.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import optax
      >>> from optax_logdamp import alrc, logadam
      >>> from optax_logdamp.flax import TrainState
      >>> model = nn.Dense(1)
      >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
      >>> state = TrainState.create(
      ...     apply_fn=model.apply,
      ...     params=model.init(jax.random.key(0), x)["params"],
      ...     tx=optax.chain(alrc(), logadam(1e-2)))
      >>> def loss_fn(params):
      ...   return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
      >>> loss, grads = jax.value_and_grad(loss_fn)(state.params)
      >>> state = state.apply_gradients(grads=grads, value=loss)
      >>> int(state.step), int(optax.tree.get(state.opt_state, "num_steps"))
      (1, 1)
    """

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
        """Updates ``step``, ``params`` and ``opt_state``, passing extra args to ``tx``.

        Each keyword is routed by name: one that names a field of this state (such as
        ``batch_stats`` in a subclass) replaces that field in the result, as in
        Flax; every other keyword (``value=loss`` for ALRC, or any extra argument an
        Optax transform takes) is passed to ``tx.update``. Transforms ignore extra
        arguments they do not use, and a plain ``GradientTransformation`` whose
        ``update`` takes no ``**kwargs`` is called without them, so ``value`` can
        always be given.

        Args:
          grads: gradients with the same tree structure as ``params``.
          **kwargs: fields to replace, and extra arguments for ``tx.update``.

        Returns:
          A new state with ``step`` incremented by one, ``params`` and ``opt_state``
          updated, and the named fields replaced.
        """
        field_names = {field.name for field in dataclasses.fields(self)}
        replaced = {name: arg for name, arg in kwargs.items() if name in field_names}
        extra_args = {name: arg for name, arg in kwargs.items() if name not in field_names}
        overwrite = OVERWRITE_WITH_GRADIENT in grads
        grads_with_opt = grads["params"] if overwrite else grads
        params_with_opt = self.params["params"] if overwrite else self.params
        if not _takes_extra_args(self.tx):
            extra_args = {}  # as optax.with_extra_args_support: a plain transform ignores them
        updates, new_opt_state = self.tx.update(
            grads_with_opt, self.opt_state, params_with_opt, **extra_args
        )
        new_params = optax.apply_updates(params_with_opt, updates)
        if overwrite:
            new_params = {
                "params": new_params,
                OVERWRITE_WITH_GRADIENT: grads[OVERWRITE_WITH_GRADIENT],
            }
        return self.replace(
            step=self.step + 1, params=new_params, opt_state=new_opt_state, **replaced
        )


__all__ = ["TrainState"]

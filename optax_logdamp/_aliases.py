"""LogAdam and LogAdamW: log dampening chained into Adam (and AdamW)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import chex
import jax.numpy as jnp
import optax

from optax_logdamp._dampening import check_scale, log_dampen
from optax_logdamp._validation import check_decay_rate, check_not_half_precision


def logadam(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    eps_root: chex.Numeric = 0.0,
    *,
    dampen_scale: chex.Numeric | Literal["auto"] = 1.0,
    mu_dtype: jnp.dtype | None = None,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam on log-dampened gradients (the "LogAdam" optimizer).

    Each gradient element is dampened by :func:`log_dampen` (:math:`s` =
    ``dampen_scale``), then Adam runs as :func:`optax.adam` does:

    .. math::
      \tilde g &= s \operatorname{sign}(g) \log(1 + |g|/s),

      m &\leftarrow \beta_1 m + (1-\beta_1)\tilde g, \quad
      v \leftarrow \beta_2 v + (1-\beta_2)\tilde g^2,

      u &= -\eta \frac{\hat m}{\sqrt{\hat v + \epsilon_{root}} + \epsilon}.

    Results equal ``optax.chain(log_dampen(dampen_scale), optax.adam(...))``. ``b1``,
    ``b2`` and ``eps`` in bfloat16 or float16 are refused (0.999 rounds to 1); for
    half-precision parameters see :doc:`Getting started </getting_started>`.

    Args:
      learning_rate: a fixed rate or a schedule (``optax.ScalarOrSchedule``).
      b1: Adam's decay of the first moment, in ``[0, 1)``.
      b2: Adam's decay of the second moment, in ``[0, 1)``.
      eps: added to the denominator outside the square root.
      eps_root: added to the second moment inside the square root.
      dampen_scale: the knee :math:`s > 0` of the dampening, or ``"auto"`` (a knee per
        tensor at 3 times its running RMS; see :func:`log_dampen`).
      mu_dtype: dtype of the first moment (``None``: that of the parameters).
      nesterov: whether to use Nesterov momentum (NAdam).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax
      >>> from optax_logdamp import logadam
      >>> tx = logadam(learning_rate=0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> optax.apply_updates(params, updates).round(4)  # float32 betas: 0.9000007
      Array([ 0.9, -1.9], dtype=float32)

    References:
      D. P. Kingma and J. Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014. D. MacDonald, `A Magnetosphere for
      Neural Networks: the LogAdam optimizer
      <https://torontoai.org/2018/03/31/a-magnetosphere-for-neural-networks/>`_, 2018.
    """
    _check_adam_arguments(b1, b2, eps, dampen_scale)
    return optax.chain(
        log_dampen(dampen_scale),
        optax.scale_by_adam(
            b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def _check_adam_arguments(b1, b2, eps, dampen_scale) -> None:
    """The checks shared by :func:`logadam` and :func:`logadamw`, under the users' names."""
    check_decay_rate("b1", b1)
    check_decay_rate("b2", b2)
    check_not_half_precision("eps", eps)
    if isinstance(dampen_scale, str):
        if dampen_scale != "auto":
            raise ValueError(f'dampen_scale must be a number or "auto", got {dampen_scale!r}.')
    else:
        check_scale(dampen_scale, "dampen_scale")


def logadamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    eps_root: chex.Numeric = 0.0,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    dampen_scale: chex.Numeric | Literal["auto"] = 1.0,
    mu_dtype: jnp.dtype | None = None,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW on log-dampened gradients: :func:`logadam` with decoupled weight decay.

    The gradient is dampened by :func:`log_dampen` (knee :math:`s` = ``dampen_scale``),
    then :func:`optax.adamw` runs on it; the weight decay acts on the parameters, not
    on the dampened gradient:

    .. math::
      \tilde g &= s \operatorname{sign}(g) \log(1 + |g|/s),

      m &\leftarrow \beta_1 m + (1-\beta_1)\tilde g, \quad
      v \leftarrow \beta_2 v + (1-\beta_2)\tilde g^2,

      u &= -\eta \left(\frac{\hat m}{\sqrt{\hat v + \epsilon_{root}} + \epsilon}
      + \lambda \theta\right).

    Results equal ``optax.chain(log_dampen(dampen_scale), optax.adamw(...))`` bit for
    bit. Arguments are those of :func:`optax.adamw` (``mu_dtype`` keyword-only, as in
    :func:`logadam`) plus ``dampen_scale``.

    Args:
      learning_rate: a fixed rate or a schedule (``optax.ScalarOrSchedule``).
      b1: Adam's decay of the first moment, in ``[0, 1)``.
      b2: Adam's decay of the second moment, in ``[0, 1)``.
      eps: added to the denominator outside the square root.
      eps_root: added to the second moment inside the square root.
      weight_decay: :math:`\lambda`, a number or a schedule; multiplied by the rate.
      mask: which parameters decay: a tree of booleans like the params (or a prefix
        of it), or a function of the params that returns one; ``None``: all.
      dampen_scale: the knee :math:`s > 0` of the dampening, or ``"auto"`` (a knee per
        tensor that follows its running RMS; see :func:`log_dampen`).
      mu_dtype: dtype of the first moment (``None``: that of the parameters).
      nesterov: whether to use Nesterov momentum (NAdamW).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax
      >>> from optax_logdamp import logadamw
      >>> tx = logadamw(learning_rate=0.25, weight_decay=1.0)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> optax.apply_updates(params, updates).round(4)  # p - 0.25 * (sign(g) + p)
      Array([ 0.5 , -1.25], dtype=float32)

    References:
      I. Loshchilov and F. Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019. D. MacDonald, `A Magnetosphere for
      Neural Networks: the LogAdam optimizer
      <https://torontoai.org/2018/03/31/a-magnetosphere-for-neural-networks/>`_, 2018.
    """
    _check_adam_arguments(b1, b2, eps, dampen_scale)
    return optax.chain(
        log_dampen(dampen_scale),
        optax.scale_by_adam(
            b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )

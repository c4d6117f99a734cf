"""Value sequences and runners shared by the ALRC tests (the engine and the transforms)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_logdamp._statistics import Rule, cap_and_fold, init_state, make_rule

WARMUP = 20  # the default warmup_steps of alrc and alrc_per_example


def run_losses(tx, losses, params=None):
    """Feeds ``losses`` one per step to ``tx`` (jitted, one compile) and records.

    Returns a dict of numpy arrays over steps: ``scale`` (factor applied to a
    gradient of ones), ``threshold_used`` (the state's threshold before the step)
    and the final state.
    """
    params = jnp.ones(3, jnp.float32) if params is None else params
    grads = jax.tree.map(jnp.ones_like, params)

    def step(state, loss):
        threshold = optax.tree.get(state, "threshold")
        updates, state = tx.update(grads, state, params, value=loss)
        return state, (jax.tree.leaves(updates)[0].ravel()[0], threshold)

    state, (scales, thresholds) = jax.jit(lambda s, ls: jax.lax.scan(step, s, ls))(
        tx.init(params), jnp.asarray(losses, jnp.float32)
    )
    return {"scale": np.asarray(scales), "threshold_used": np.asarray(thresholds), "state": state}


@functools.partial(jax.jit, static_argnums=0)
def _scan_rule(from_data, num_stddev, decay, warmup_steps, state, values):
    rule = Rule(num_stddev, decay, warmup_steps, from_data)

    def step(state, value):
        scale, _, new_state = cap_and_fold(rule, state, value)
        return new_state, (scale, state.threshold)

    return jax.lax.scan(step, state, values)


def run_rule(values, num_stddev=3.0, decay=0.999, warmup_steps=WARMUP, mu1=None, mu2=None):
    """Feeds ``values`` (one per step, or one row of values per step) to the engine.

    The statistics engine alone (``make_rule``, ``init_state``, then ``cap_and_fold``
    in a jitted scan), with the rule's hyperparameters as arguments: one compilation
    per shape of ``values``. Returns per-step ``scale`` (the mean gradient factor),
    ``threshold`` (the state's threshold before the step) and the final ``state``.
    """
    rule = make_rule(num_stddev, decay, mu1, mu2, warmup_steps)
    state = init_state(rule, mu1, mu2)
    args = (rule.num_stddev, rule.decay, rule.warmup_steps, state)
    values = jnp.asarray(values, jnp.float32)
    state, (scales, thresholds) = _scan_rule(rule.from_data, *args, values)
    return {"scale": np.asarray(scales), "threshold": np.asarray(thresholds), "state": state}


def noisy_training_losses(num_steps, seed, *, start=5.0, end=0.5, noise=0.1):
    """A decreasing training-loss curve with multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    trend = start * (end / start) ** (np.arange(num_steps) / num_steps)
    return trend * np.exp(noise * rng.standard_normal(num_steps))


def from_data_reference(values, num_stddev=3.0, decay=0.999, warmup=WARMUP):
    """The from-data rule in float64: thresholds, factors, and which steps restarted.

    Bias-corrected moving averages of the capped value; a threshold of mean + n std
    with a floor of (1 + n) mean during warm-up (none before the first value); during
    warm-up, a value below mean / (1 + n) restarts the statistics from it.
    """
    count, mean, var = 0, 0.0, 0.0
    thresholds, scales, restarts, floored = [], [], [], []
    for step, x in enumerate(values):
        if count == 0:
            threshold, floor = np.inf, False
        else:
            threshold = mean + num_stddev * np.sqrt(var)
            floor = step < warmup and (1 + num_stddev) * mean > threshold
            if floor:
                threshold = (1 + num_stddev) * mean
        capped = x > threshold and x > 0
        scale = threshold / x if capped else 1.0
        value = threshold if capped else x
        restart = step < warmup and count > 0 and mean > 0 and value * (1 + num_stddev) < mean
        count += 1
        if restart:
            count, mean, var = 1, value, 0.0
        else:
            rate = min(1.0, (1 - decay) / (1 - decay**count))
            delta = value - mean
            mean += rate * delta
            var = (1 - rate) * (var + rate * delta**2)
        thresholds.append(threshold)
        scales.append(scale)
        restarts.append(restart)
        floored.append(floor and capped)
    return np.asarray(thresholds), np.asarray(scales), np.asarray(restarts), np.asarray(floored)

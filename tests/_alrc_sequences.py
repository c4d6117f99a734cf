"""Loss sequences and a runner shared by the ALRC tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


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


def noisy_training_losses(num_steps, seed, *, start=5.0, end=0.5, noise=0.1):
    """A decreasing training-loss curve with multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    trend = start * (end / start) ** (np.arange(num_steps) / num_steps)
    return trend * np.exp(noise * rng.standard_normal(num_steps))

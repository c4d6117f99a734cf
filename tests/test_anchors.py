"""The benchmark anchors (``benchmarks/anchors.py``) follow their published rules.

ZClip (Kumar et al., 2025): EMA alpha 0.97, z threshold 2.5, a warm-up of 25 steps whose
norms give the exact mean and variance, and a norm with z-score ``z > 2.5`` rescaled to
``mean + z_thr**2 * std / z``; the statistics then take the clipped norm.
Skip-step (Levanter / OLMo-core): a step whose loss or gradient norm exceeds the mean +
6 std of the last 128 steps is skipped, once 64 steps are known.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from anchors import count_interventions, skip_step_on_spikes, zclip


def zclip_reference(norms, alpha=0.97, z_threshold=2.5, warmup=25, eps=1e-6):
    """ZClip's rule in float64: the norm each step's gradient is rescaled to."""
    mean = var = 0.0
    out = []
    for step, norm in enumerate(norms):
        if step < warmup:
            out.append(norm)
            history = norms[: step + 1]
            mean, var = float(np.mean(history)), float(np.var(history))
            continue
        std = np.sqrt(var)
        z = (norm - mean) / (std + eps)
        clipped = mean + z_threshold**2 * std / z if z > z_threshold else norm
        out.append(clipped)
        mean = alpha * mean + (1 - alpha) * clipped
        var = alpha * var + (1 - alpha) * (clipped - mean) ** 2
    return np.asarray(out)


def run_norms(tx, norms, losses=None):
    """Feeds gradients of the given norms (and losses) to ``tx``; returns the update norms."""
    params = jnp.zeros(4)
    direction = jnp.array([0.5, -0.5, 0.5, 0.5])
    losses = np.ones(len(norms)) if losses is None else losses

    def step(state, inputs):
        norm, loss = inputs
        updates, state = optax.with_extra_args_support(tx).update(
            norm * direction, state, params, value=loss
        )
        return state, optax.tree.norm(updates)

    xs = (jnp.asarray(norms, jnp.float32), jnp.asarray(losses, jnp.float32))
    state, out = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(tx.init(params), xs)
    return np.asarray(out), state


def test_zclip_matches_its_published_rule():
    rng = np.random.default_rng(0)
    norms = 1.0 + 0.1 * rng.standard_normal(400)
    norms[[10, 60, 200, 201, 350]] *= [50.0, 5.0, 20.0, 20.0, 3.0]  # one inside warm-up
    got, state = run_norms(zclip(), norms)
    want = zclip_reference(norms)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert got[10] == pytest.approx(norms[10], rel=1e-6)  # warm-up: never clipped
    clipped = np.flatnonzero(~np.isclose(want, norms))
    assert {200, 201} <= set(clipped.tolist())
    # The 50x norm at step 10 enters ZClip's warm-up statistics and inflates the variance
    # for a long time: the 5x norm at step 60 passes unclipped.
    assert 60 not in clipped
    assert int(state.num_clipped) == len(clipped)
    assert int(count_interventions(state)) == len(clipped)


def test_zclip_warmup_gives_the_exact_mean_and_variance():
    norms = np.linspace(1.0, 3.0, 25)
    _, state = run_norms(zclip(), norms)
    assert float(state.mean) == pytest.approx(np.mean(norms), rel=1e-6)
    assert float(state.var) == pytest.approx(np.var(norms), rel=1e-5)


def skip_reference(losses, norms, window=128, num_stddev=6.0):
    """Which steps the skip-step rule skips, in float64."""
    skipped = []
    for step in range(len(losses)):
        if step == 0:
            skipped.append(not np.isfinite(losses[0]))
            continue
        history = slice(max(0, step - window), step)
        loss_band = np.mean(losses[history]) + num_stddev * max(np.std(losses[history]), 1e-6)
        norm_band = np.mean(norms[history]) + num_stddev * max(np.std(norms[history]), 1e-6)
        spike = losses[step] > loss_band or norms[step] > norm_band
        skipped.append(not np.isfinite(losses[step]) or (step >= window // 2 and spike))
    return np.asarray(skipped)


def test_skip_step_matches_its_published_rule():
    rng = np.random.default_rng(1)
    losses = 2.0 + 0.1 * rng.standard_normal(400)
    norms = 1.0 + 0.05 * rng.standard_normal(400)
    losses[[30, 100, 300]] *= 10.0  # 30: before 64 steps are known, not skipped
    norms[[150, 250]] *= 10.0
    losses[350] = np.nan
    got, state = run_norms(skip_step_on_spikes(optax.sgd(1.0)), norms, losses)
    want = skip_reference(losses, norms)
    np.testing.assert_array_equal(got == 0, want)
    assert set(np.flatnonzero(want).tolist()) == {100, 150, 250, 300, 350}
    assert int(state.num_skipped) == 5
    assert int(count_interventions(state)) == 5


def test_skip_step_leaves_the_inner_state_untouched_on_a_skipped_step():
    tx = skip_step_on_spikes(optax.adam(1e-3), window=4)
    params = jnp.zeros(2)
    state = tx.init(params)
    for _ in range(4):
        _, state = tx.update(jnp.ones(2), state, params, value=1.0)
    updates, new_state = tx.update(jnp.ones(2), state, params, value=jnp.inf)
    np.testing.assert_array_equal(updates, 0.0)
    jax.tree.map(np.testing.assert_array_equal, new_state.inner, state.inner)

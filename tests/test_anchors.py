"""The benchmark anchors (``benchmarks/anchors.py``) follow their published rules.

ZClip (Kumar et al., 2025): EMA alpha 0.97, z threshold 2.5, a warm-up of 25 steps whose
norms give the exact mean and variance, and a norm with z-score ``z > 2.5`` rescaled to
``mean + z_thr**2 * std / z``; the statistics then take the clipped norm.
Skip-step (Levanter / OLMo-core): a step whose loss or gradient norm exceeds the mean +
6 std of the last 128 steps is skipped, once 64 steps are known.
AdaGC (Wang et al., 2025): a global clip to 1.0 and a running minimum of each tensor's
norm for 100 steps, then each tensor clipped to 1.05x an EMA (beta 0.98) of its clipped
norms. Update clipping (StableAdamW, Wortsman et al., 2023): each tensor's Adam step
divided by max(1, RMS(g**2 / v_hat)). SPAM (Huang et al., 2025): coordinates with
g**2 > 5000 v clipped to sqrt(5000 v), both moments reset every 500 steps, then a
cosine ramp of the step over 150 steps.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from anchors import adagc, count_interventions, skip_step_on_spikes, spam, update_clipping, zclip


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


def adagc_reference(norms, relative=1.05, decay=0.98, absolute=1.0, warmup=100):
    """AdaGC in float64 for tensors with per-step norms ``norms`` (steps, tensors).

    Returns the norm each tensor's gradient is rescaled to at every step.
    """
    gamma = np.full(norms.shape[1], np.inf)
    out = []
    for step, row in enumerate(norms):
        if step < warmup:
            clipped = row * min(1.0, absolute / np.sqrt(np.sum(row**2)))
            gamma = np.minimum(gamma, clipped)
        else:
            clipped = np.minimum(row, relative * gamma)
            gamma = decay * gamma + (1 - decay) * clipped
        out.append(clipped)
    return np.asarray(out)


def test_adagc_matches_its_published_rule():
    rng = np.random.default_rng(2)
    norms = np.abs(1.0 + 0.2 * rng.standard_normal((300, 2))) * [0.5, 2.0]
    norms[[50, 150, 151, 260], [0, 1, 1, 0]] *= [30.0, 10.0, 10.0, 4.0]
    directions = {"a": jnp.array([0.6, 0.8]), "b": jnp.array([1.0, 0.0, 0.0])}

    def step(state, row):
        grads = {"a": row[0] * directions["a"], "b": row[1] * directions["b"]}
        updates, state = adagc().update(grads, state)
        return state, jnp.stack([optax.tree.norm(updates["a"]), optax.tree.norm(updates["b"])])

    params = jax.tree.map(jnp.zeros_like, directions)
    xs = jnp.asarray(norms, jnp.float32)
    state, got = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(adagc().init(params), xs)
    want = adagc_reference(norms)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5)
    clipped_steps = np.flatnonzero((want < norms * (1 - 1e-6))[100:].any(axis=1)) + 100
    assert {150, 151, 260} <= set(clipped_steps.tolist())
    assert int(state.num_clipped) == len(clipped_steps)
    assert int(count_interventions(state)) == len(clipped_steps)


def test_update_clipping_divides_each_tensor_step_by_the_rms_of_g2_over_v():
    rng = np.random.default_rng(3)
    grads = rng.standard_normal((40, 2, 3)) * [[1.0], [0.01]]
    grads[25, 0] *= 20.0  # tensor 0 spikes: its step shrinks, tensor 1's does not
    b1, b2, eps = 0.9, 0.95, 1e-8
    m = v = np.zeros((2, 3))
    want, adam = [], []
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        rms = np.sqrt(np.mean(g**2 / np.maximum(v_hat, eps**2), axis=1, keepdims=True))
        adam.append(m_hat / (np.sqrt(v_hat) + eps))
        want.append(adam[-1] / np.maximum(1.0, rms))
    tx = update_clipping(b1, b2, eps)
    state = tx.init({"x": jnp.zeros(3), "y": jnp.zeros(3)})
    got = []
    for g in grads.astype(np.float32):
        updates, state = tx.update({"x": jnp.asarray(g[0]), "y": jnp.asarray(g[1])}, state)
        got.append(np.stack([updates["x"], updates["y"]]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-7)
    got = np.asarray(got)
    # At the spike, tensor 0's step is Adam's divided by an RMS well above 1; tensor 1's is Adam's.
    assert np.all(np.abs(got[25, 0]) < 0.5 * np.abs(adam[25][0]))
    np.testing.assert_allclose(got[25, 1], adam[25][1], rtol=2e-5)
    assert int(state.num_clipped) >= 1


def test_spam_clips_spikes_resets_the_moments_and_ramps_back():
    b1, b2, eps, theta = 0.9, 0.999, 1e-8, 5000.0
    grads = np.full((700, 2), 0.01)
    grads[:, 1] = np.where(np.arange(700) % 2, 0.01, -0.01)
    grads[300, 0] = 100.0  # g**2 = 1e4 >> 5000 v: clipped to sqrt(5000 v)
    m = v = np.zeros(2)
    want = []
    for t, g in enumerate(grads, start=1):
        if t - 1 > 0 and (t - 1) % 500 == 0:
            m = v = np.zeros(2)
        g = np.where((g**2 > theta * v) & (v > 0), np.sign(g) * np.sqrt(theta * v), g)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        since = (t - 1) % 500
        ramp = 0.5 * (1 - np.cos(np.pi * (since + 1) / 150)) if t > 500 and since < 150 else 1.0
        want.append(ramp * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
    tx = spam()
    state = tx.init(jnp.zeros(2))
    step = jax.jit(tx.update)
    got = []
    for g in grads.astype(np.float32):
        updates, state = step(jnp.asarray(g), state)
        got.append(np.asarray(updates))
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert abs(got[300, 0]) < 2.0  # without the clip, the 1e4x spike gives a step of ~3
    assert abs(got[500, 0]) < 1e-3 * abs(got[499, 0])  # reset at step 500: the ramp starts at ~0
    assert int(state.num_clipped) == 1
    assert int(count_interventions(state)) == 1

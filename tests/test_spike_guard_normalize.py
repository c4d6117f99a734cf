"""``spike_guard(normalize_steps=K)``: early steps rescaled toward the running mean norm.

The float64 reference is the from-data ALRC rule of ``tests/test_alrc_exponent.py`` (the
factor ``min(1, t / G) ** p``) with the normalizing gain ``min(1 + n, mean / G) ** (1 - k / K)``
on top at step ``k < K``, ``mean`` being the running mean just folded (this step's
capped norm included).
"""

import _multidevice_runs as mdr
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_alrc_exponent import exact_norms, gradients_with_norms, rule_steps, spiky

from optax_logdamp import log_dampen, spike_guard

ALWAYS = 10**9  # more steps than any test runs: the gain at (almost) full strength


def reference(xs, steps=ALWAYS, exponent=2.0, num_stddev=3.0):
    """Per step in float64: the factor (ALRC's ``(t / G) ** p`` times the gain), the
    threshold ``t`` and the running mean the gain used."""
    factors, thresholds, means = [], [], []
    for step, (x, (threshold, capped, mean)) in enumerate(
        zip(xs, rule_steps(xs, num_stddev), strict=True)
    ):
        cap = (threshold / x) ** exponent if capped else 1.0
        weight = max(0.0, 1 - step / steps)
        factors.append(cap * min(1 + num_stddev, mean / x) ** weight)
        thresholds.append(threshold)
        means.append(mean)
    return np.asarray(factors), np.asarray(thresholds), np.asarray(means)


def run(tx, grads):
    """The updates of every step (one jitted scan) and the final state."""
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)

    def step(state, g):
        updates, state = tx.update(g, state, params)
        return state, updates

    state, updates = jax.jit(lambda s, g: jax.lax.scan(step, s, g))(tx.init(params), grads)
    return jax.device_get(updates), jax.device_get(state)


def applied_factor(updates, grads):
    """The one factor each step applied to every element (checked to be one factor)."""
    u = np.concatenate([np.asarray(a).reshape(len(a), -1) for a in jax.tree.leaves(updates)], 1)
    g = np.concatenate([np.asarray(a).reshape(len(a), -1) for a in jax.tree.leaves(grads)], 1)
    ratio = u.astype(np.float64) / g
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-6)
    return ratio[:, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_float64_reference_over_a_long_sequence(seed):
    grads = gradients_with_norms(spiky(3000, seed), seed)
    xs = exact_norms(grads)
    updates, state = run(spike_guard(knee=None, normalize_steps=ALWAYS), grads)
    got = applied_factor(updates, grads)
    want, thresholds, means = reference(xs)
    clear = np.abs(xs - thresholds) > 1e-3 * xs  # no near-ties between G and t
    np.testing.assert_allclose(got[clear], want[clear], rtol=5e-4)
    assert np.mean(got > 1) > 0.3  # ordinary steps below the mean are scaled up ...
    assert np.mean(want[clear] < 1 / 2) > 0.01  # ... and capped spikes far down
    assert int(state.grad_norm.num_clipped) > 30
    np.testing.assert_allclose(float(state.grad_norm.mean), means[-1], rtol=1e-4)
    # What normalizing means: an ordinary step leaves with the running mean as its norm,
    # a capped one with less.
    out = exact_norms(updates)
    ordinary = (xs < thresholds) & (xs > means / 4)
    assert ordinary.mean() > 0.8
    np.testing.assert_allclose(out[ordinary], means[ordinary], rtol=5e-4)
    capped = clear & (xs > thresholds)
    assert np.all(out[capped] < means[capped])


def test_the_gain_is_at_most_one_plus_num_stddev_and_never_flips_a_sign():
    norms = np.concatenate([np.full(100, 1.0), np.full(50, 1e-3), np.full(50, 1.0)])
    grads = gradients_with_norms(norms)
    for num_stddev in (1.0, 3.0):
        updates, _ = run(
            spike_guard(knee=None, normalize_steps=ALWAYS, num_stddev=num_stddev), grads
        )
        factor = applied_factor(updates, grads)
        assert np.all(factor >= 0)
        np.testing.assert_allclose(factor[100:150], 1 + num_stddev, rtol=1e-6)
        np.testing.assert_allclose(factor[:100], 1.0, rtol=1e-5)  # a constant norm: no change


@pytest.mark.parametrize("steps", [1, 300, 1000])
def test_the_gain_fades_out_by_normalize_steps(steps):
    """Step ``k < K`` follows the reference's fading gain; from step ``K`` on the updates
    are those of ``normalize_steps=0`` bit for bit (the statistics never depend on it)."""
    grads = gradients_with_norms(spiky(1500, 8), 8)
    xs = exact_norms(grads)
    updates, state = run(spike_guard(knee=None, normalize_steps=steps), grads)
    plain, plain_state = run(spike_guard(knee=None), grads)
    jax.tree.map(np.testing.assert_array_equal, state, plain_state)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a)[steps:], np.asarray(b)[steps:])
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])  # gain 1 at first
    got = applied_factor(updates, grads)
    want, thresholds, _ = reference(xs, steps=steps)
    clear = np.abs(xs - thresholds) > 1e-3 * xs
    np.testing.assert_allclose(got[clear], want[clear], rtol=5e-4)
    if steps > 1:
        assert np.mean(np.abs(got[1:steps] - applied_factor(plain, grads)[1:steps]) > 1e-3) > 0.5


def test_inject_hyperparams_traces_normalize_steps():
    grads = gradients_with_norms(spiky(400, 10), 10)
    for steps in (0, 200):
        injected = optax.inject_hyperparams(spike_guard)(knee=None, normalize_steps=steps)
        got, _ = run(injected, grads)
        want, _ = run(spike_guard(knee=None, normalize_steps=steps), grads)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    with pytest.raises(ValueError, match=r"^normalize_steps > 0"):
        optax.inject_hyperparams(spike_guard)(signal="loss", normalize_steps=5).init({"w": 0.0})


def test_zero_steps_is_spike_guard_bitwise():
    grads = gradients_with_norms(spiky(300, 9), 9)
    for a, b in zip(
        jax.tree.leaves(run(spike_guard(normalize_steps=0), grads)),
        jax.tree.leaves(run(spike_guard(), grads)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("scale", [2.0**-20, 2.0**12])
def test_scale_invariant_bitwise_for_powers_of_two(scale):
    grads = gradients_with_norms(spiky(500, 3), 3)
    scaled = jax.tree.map(lambda g: g * np.float32(scale), grads)
    updates, _ = run(spike_guard(normalize_steps=ALWAYS), grads)
    got, _ = run(spike_guard(normalize_steps=ALWAYS), scaled)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a) * np.float32(scale), np.asarray(b))


def test_scale_invariant_for_any_factor():
    grads = gradients_with_norms(spiky(500, 5), 5)
    factors = []
    for scale in (1.0, 1e-3, 37.0):
        scaled = jax.tree.map(lambda g, s=scale: g * np.float32(s), grads)
        updates, _ = run(spike_guard(knee=None, normalize_steps=ALWAYS), scaled)
        factors.append(applied_factor(updates, scaled))
    np.testing.assert_allclose(factors[1], factors[0], rtol=1e-4)
    np.testing.assert_allclose(factors[2], factors[0], rtol=1e-4)


def test_the_knees_dampen_the_normalized_step():
    """With the knee, the updates are ``log_dampen("auto")`` of the normalized step."""
    grads = gradients_with_norms(spiky(800, 6), 6)
    normalized, _ = run(spike_guard(knee=None, normalize_steps=ALWAYS), grads)
    got, state = run(spike_guard(normalize_steps=ALWAYS, knee=3.0), grads)
    want, knees = run(log_dampen("auto", auto_multiple=3.0), normalized)
    assert not np.array_equal(np.asarray(got["w"]), np.asarray(normalized["w"]))  # it bends
    np.testing.assert_array_equal(state.knee.count["w"], knees.count["w"])
    for name in ("w", "b"):
        np.testing.assert_array_max_ulp(
            state.knee.log_mean_square[name], knees.log_mean_square[name], maxulp=8
        )
        np.testing.assert_array_max_ulp(np.asarray(got[name]), np.asarray(want[name]), maxulp=4)


def test_nonfinite_and_zero_steps():
    norms = np.ones(60)
    grads = gradients_with_norms(norms)
    grads["w"] = grads["w"].at[30, 0, 0].set(jnp.nan)
    grads = jax.tree.map(lambda g: g.at[40].set(0.0), grads)
    updates, state = run(spike_guard(normalize_steps=ALWAYS), grads)
    for leaf in jax.tree.leaves(updates):
        leaf = np.asarray(leaf)
        assert np.all(np.isfinite(leaf))
        assert np.all(leaf[30] == 0) and np.all(leaf[40] == 0)
    assert int(state.grad_norm.num_nonfinite) == 1
    for leaf in jax.tree.leaves(state):
        if np.asarray(leaf).dtype.kind == "f":
            assert np.all(np.isfinite(np.asarray(leaf)) | np.isneginf(np.asarray(leaf)))
    # Skipping the NaN step leaves the statistics as if it had not come.
    without = jax.tree.map(lambda g: jnp.concatenate([g[:30], g[31:]]), grads)
    _, clean = run(spike_guard(normalize_steps=ALWAYS), without)
    np.testing.assert_array_equal(state.grad_norm.mean, clean.grad_norm.mean)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"normalize_steps": 1.5}, ValueError, r"^normalize_steps must be an integer >= 0"),
        ({"normalize_steps": True}, TypeError, r"^normalize_steps must be an integer >= 0"),
        ({"normalize_steps": -1}, ValueError, r"^normalize_steps must be an integer >= 0"),
        ({"normalize_steps": "9"}, ValueError, r"^normalize_steps must be a real scalar"),
        (
            {"normalize_steps": 10, "signal": "loss"},
            ValueError,
            r'^normalize_steps > 0 .*signal="loss"',
        ),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        spike_guard(**kwargs)


def test_both_signals_normalize_to_the_norm():
    """With ``signal="both"`` the gain still follows the norm; the loss only caps."""
    grads = gradients_with_norms(np.linspace(1.0, 0.5, 100), 7)
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), grads)
    tx = spike_guard(signal="both", knee=None, normalize_steps=ALWAYS)
    state = tx.init(params)
    step = jax.jit(lambda s, g: tx.update(g, s, params, value=jnp.float32(1.0)))
    for i in range(100):
        updates, state = step(state, jax.tree.map(lambda g, i=i: g[i], grads))
    assert int(state.grad_norm.num_clipped) == 0 and int(state.loss.num_clipped) == 0
    norm = float(optax.tree.norm(updates))
    assert norm == pytest.approx(float(state.grad_norm.mean), rel=1e-5)
    assert norm > 0.5 * 1.2  # the mean of a falling norm: the last step was scaled up


# --------------------------------------------------------------------------- multi-device

MULTI = {
    "normalize+adam": mdr.Case(
        lambda axis: optax.chain(
            spike_guard(normalize_steps=ALWAYS, axis_name=axis), optax.adam(0.05)
        ),
        False,
    ),
}


@mdr.needs_eight_devices
@pytest.mark.parametrize("name", list(MULTI))
def test_multi_device_agrees_with_single_device(name):
    reference_run = mdr.single_device(MULTI[name])
    mdr.assert_agrees_on_every_layout(MULTI[name], reference_run)

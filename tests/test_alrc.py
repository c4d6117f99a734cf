"""alrc, alrc_per_example and cap_losses (``_alrc.py``): the transforms around the engine.

The statistics themselves (the paper's rule and the from-data rule against float64
references, warm-up, units, signed values) are tested on the engine alone in
``test_statistics.py``; here, that each transform feeds the engine the right statistic
and applies its factor: batch ALRC of the loss, the gradient norm or both, and
per-example ALRC (``cap_losses`` in the loss, the statistics folded in ``update``),
against the paper's per-example rule in float64. Then the interface: states, extra
arguments, errors, hyperparameters, ``jit``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _alrc_sequences import noisy_training_losses, run_losses, run_rule

from optax_logdamp import (
    ALRCPerExampleState,
    ALRCSignalsState,
    ALRCState,
    alrc,
    alrc_per_example,
    cap_losses,
    logadam,
    spike_guard,
)
from optax_logdamp._numerics import global_norm

STATISTICS = ("count", "mean", "var", "threshold", "num_steps", "num_losses", "num_clipped")


def spiky_norms(num_steps, seed, *, level=1.0, spike_rate=0.02):
    """A drifting, noisy gradient-norm sequence with spikes of 3x to 1000x."""
    rng = np.random.default_rng(seed)
    norms = level * noisy_training_losses(num_steps, seed, start=2.0, end=0.7, noise=0.15)
    spikes = rng.random(num_steps) < spike_rate
    norms[spikes] *= 10.0 ** rng.uniform(0.5, 3, spikes.sum())
    return norms


def gradients_with_norms(norms, seed=0, dtype=jnp.float32):
    """Gradient trees (two leaves, 7 elements) whose global norms are ``norms``."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(norms), 7))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    grads = directions * np.asarray(norms)[:, None]
    return {
        "w": jnp.asarray(grads[:, :4].reshape(-1, 2, 2), dtype),
        "b": jnp.asarray(grads[:, 4:], dtype),
    }


def run_gradients(tx, grads, losses=None):
    """Feeds one gradient (and loss) per step to ``tx`` in one jitted scan.

    Returns per-step ``factor`` (the applied scale, read off the updates) and the
    final state.
    """
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
    losses = jnp.ones(jax.tree.leaves(grads)[0].shape[0]) if losses is None else losses

    def step(state, inputs):
        g, loss = inputs
        updates, state = tx.update(g, state, params, value=loss)
        ratio = optax.tree.norm(updates) / jnp.maximum(optax.tree.norm(g), 1e-30)
        return state, ratio

    scan = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))
    state, factors = scan(tx.init(params), (grads, jnp.asarray(losses, jnp.float32)))
    return {"factor": np.asarray(factors), "state": state}


def assert_statistics_equal(got, want, rtol=0.0):
    """The statistics of two :class:`ALRCState` (not the last factor), to ``rtol``."""
    assert type(got) is type(want) is ALRCState
    for field in STATISTICS:
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=rtol)


# ----------------------------------------------------------------- batch ALRC: the signal


def test_the_loss_signal_feeds_the_loss_to_the_engine():
    losses = noisy_training_losses(1500, 0, noise=0.3)
    losses[[11, 40, 300, 900]] *= 100.0
    for kwargs in ({}, {"mu1_init": 5.0, "mu2_init": 30.0}):
        got = run_losses(alrc(**kwargs), losses)
        want = run_rule(losses, mu1=kwargs.get("mu1_init"), mu2=kwargs.get("mu2_init"))
        np.testing.assert_allclose(got["scale"], want["scale"], rtol=1e-6)
        np.testing.assert_array_equal(got["scale"] < 1, want["scale"] < 1)
        assert np.sum(got["scale"] < 1) >= 4
        assert_statistics_equal(got["state"], want["state"], rtol=1e-6)


def test_the_grad_norm_signal_feeds_the_global_norm_to_the_engine():
    norms = spiky_norms(1500, seed=0)
    norms[2] *= 300.0
    grads = gradients_with_norms(norms)
    got = run_gradients(alrc(signal="grad_norm"), grads)
    want = run_rule(jax.vmap(global_norm)(grads))
    np.testing.assert_allclose(got["factor"], want["scale"], rtol=1e-5)
    assert np.sum(want["scale"] < 1) > 10
    state = got["state"]
    assert isinstance(state, ALRCSignalsState) and isinstance(state.loss, optax.EmptyState)
    assert_statistics_equal(state.grad_norm, want["state"], rtol=1e-6)


def test_both_takes_the_smaller_factor_of_two_independent_statistics():
    norms = spiky_norms(1500, seed=3)
    losses = noisy_training_losses(1500, 4, noise=0.2)
    losses[[100, 700, 1200]] *= 50.0
    grads = gradients_with_norms(norms, seed=3)
    both = run_gradients(alrc(signal="both"), grads, losses)
    norm_only = run_gradients(alrc(signal="grad_norm"), grads, losses)
    loss_only = run_losses(alrc(), losses, params=jnp.ones(1))
    # Each statistic evolves as it does alone (nothing here is non-finite).
    state = both["state"]
    assert isinstance(state, ALRCSignalsState)
    jax.tree.map(np.testing.assert_array_equal, state.grad_norm, norm_only["state"].grad_norm)
    jax.tree.map(np.testing.assert_array_equal, state.loss, loss_only["state"])
    loss_factors = loss_only["scale"]
    np.testing.assert_allclose(
        both["factor"], np.minimum(norm_only["factor"], loss_factors), rtol=1e-5
    )
    assert np.sum(loss_factors < norm_only["factor"]) >= 3  # both sources of the min occur
    assert np.sum(norm_only["factor"] < loss_factors) >= 3


def test_updates_are_scaled_by_threshold_over_loss():
    tx = alrc(mu1_init=1.0, mu2_init=1.25)  # threshold 1 + 3 * 0.5 = 2.5
    grads = {"a": jnp.asarray([2.0, -4.0]), "b": jnp.asarray(1.0, jnp.bfloat16)}
    state = tx.init(grads)
    updates, state = tx.update(grads, state, value=10.0)
    np.testing.assert_allclose(np.asarray(updates["a"]), [0.5, -1.0], rtol=1e-6)
    assert updates["b"].dtype == jnp.bfloat16 and float(updates["b"]) == 0.25
    assert float(state.scale) == pytest.approx(0.25) and int(state.num_clipped) == 1


# (signal, the bad loss, the bad gradient element, the paper's initial moments or not): a
# non-finite statistic of any signal skips the step; a norm beyond float32 (1e30**2
# overflows) is not finite either.
NONFINITE = {
    "loss_nan": ("loss", np.nan, None, False),
    "loss_inf": ("loss", np.inf, None, False),
    "loss_-inf": ("loss", -np.inf, None, False),
    "loss_nan_paper": ("loss", np.nan, None, True),
    "loss_inf_paper": ("loss", np.inf, None, True),
    "grad_norm_nan": ("grad_norm", None, np.nan, False),
    "grad_norm_inf": ("grad_norm", None, np.inf, False),
    "grad_norm_overflow": ("grad_norm", None, 1e30, False),
    "both_loss_nan": ("both", np.nan, None, False),
    "both_grad_inf": ("both", None, np.inf, False),
}


@pytest.mark.parametrize("case", list(NONFINITE))
def test_a_non_finite_step_is_zeroed_and_keeps_the_statistics(case):
    signal, bad_loss, bad_grad, paper = NONFINITE[case]
    tx = alrc(signal=signal, **({"mu1_init": 1.0, "mu2_init": 2.0} if paper else {}))
    params = {"w": jnp.zeros(3), "b": jnp.zeros((), jnp.bfloat16)}
    state = tx.init(params)
    good = {"w": jnp.ones(3), "b": jnp.ones((), jnp.bfloat16)}
    for loss in (1.0, 1.1, 0.9):
        _, state = tx.update(good, state, params, value=loss)
    grads = good
    if bad_grad is not None:
        grads = {"w": jnp.asarray([1.0, bad_grad, 1.0]), "b": jnp.ones((), jnp.bfloat16)}
    if signal == "loss":  # the loss alone decides: the gradient may be broken too
        grads = {"w": jnp.asarray([np.nan, 1.0, np.inf]), "b": jnp.asarray(np.nan, jnp.bfloat16)}
    value = 1.0 if bad_loss is None else bad_loss
    updates, new_state = jax.jit(tx.update)(grads, state, params, value=value)
    zeros = jax.tree.map(jnp.zeros_like, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, zeros)
    chex.assert_trees_all_equal(updates, zeros)
    for leaf in jax.tree.leaves(updates):
        assert not np.any(np.signbit(np.asarray(leaf, np.float32)))  # +0, not -0
    pairs = [(state, new_state)] if signal == "loss" else [(state.grad_norm, new_state.grad_norm)]
    if signal == "both":
        pairs.append((state.loss, new_state.loss))
    for before, after in pairs:  # every signal counts the step as skipped
        assert_statistics_equal(after, before)
        assert int(after.num_nonfinite) == int(before.num_nonfinite) + 1
        assert float(after.scale) == 0.0
        assert np.isfinite(float(after.mean)) and np.isfinite(float(after.var))


@pytest.mark.parametrize("signal", ["loss", "grad_norm", "both"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_updates_keep_their_dtype_and_statistics_are_float32(dtype, signal):
    tx = alrc(signal=signal)
    params = {"w": jnp.zeros((4, 4), dtype)}
    state = tx.init(params)
    grads = {"w": jnp.full((4, 4), 300.0, dtype)}  # float16: 300**2 * 16 would overflow
    updates, state = tx.update(grads, state, params, value=jnp.asarray(2.0, dtype))
    assert updates["w"].dtype == dtype
    found = [state] if signal == "loss" else [state.grad_norm]
    if signal == "both":
        found.append(state.loss)
    for stats in found:
        assert stats.mean.dtype == jnp.float32 and stats.var.dtype == jnp.float32
    if signal != "loss":
        np.testing.assert_allclose(state.grad_norm.mean, 1200.0, rtol=1e-6)


def test_state_structure_and_tree_get_in_a_chain():
    params = {"w": jnp.ones(2)}
    loss_state = optax.chain(alrc(), optax.adam(1e-3)).init(params)
    assert isinstance(loss_state[0], ALRCState)
    assert float(optax.tree.get(loss_state, "mean")) == 0.0
    assert float(optax.tree.get(loss_state, "threshold")) == np.inf
    norm_state = alrc(signal="grad_norm").init(params)
    assert isinstance(norm_state.loss, optax.EmptyState)
    assert isinstance(norm_state.grad_norm, ALRCState)
    chain = optax.chain(alrc(signal="grad_norm"), optax.adam(1e-3)).init(params)
    assert optax.tree.get(chain, "mean") == 0.0  # one statistic: unambiguous
    both = alrc(signal="both").init(params)
    assert isinstance(both.loss, ALRCState) and both.loss is not both.grad_norm
    for state in (loss_state[0], both.loss, both.grad_norm):  # same size for any model
        assert len(state) == len(ALRCState._fields)
        assert all(jnp.shape(leaf) == () for leaf in state)


# ----------------------------------------------------------------- the value extra argument


@pytest.mark.parametrize(
    "make",
    [alrc, lambda: alrc(signal="both"), lambda: spike_guard(signal="both"), alrc_per_example],
    ids=["alrc", "alrc_both", "spike_guard_both", "alrc_per_example"],
)
def test_a_transform_fed_by_the_loss_needs_value_and_says_so(make):
    tx = optax.chain(make(), optax.sgd(1.0))
    params = jnp.ones(2)
    with pytest.raises(TypeError, match=r"needs the loss of this step.*value=loss"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(TypeError, match=r"value must be a real loss.*got str '1\.0'"):
        tx.update(params, tx.init(params), params, value="1.0")


def test_grad_norm_needs_no_value_and_extra_arguments_are_ignored():
    params = jnp.zeros(2)
    tx = alrc(signal="grad_norm")
    updates, _ = tx.update(jnp.ones(2), tx.init(params), params)  # no value at all
    np.testing.assert_array_equal(updates, 1.0)
    tx = alrc()
    updates, _ = tx.update(jnp.ones(2), tx.init(params), params, value=1.0, rng=3, step=1)
    np.testing.assert_array_equal(updates, 1.0)


@pytest.mark.parametrize("signal", ["loss", "both"])
@pytest.mark.parametrize("value", [jnp.ones(4), jnp.ones((1,)), jnp.ones((2, 2))])
def test_a_non_scalar_loss_is_refused_with_a_pointer(value, signal):
    tx = alrc(signal=signal)
    with pytest.raises(ValueError, match=r"scalar loss of the batch.*alrc_per_example"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)), value=value)


def test_a_complex_loss_is_refused():
    tx = alrc()
    with pytest.raises(TypeError, match=r"alrc: value must be a real loss.*complex"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)), value=1.0 + 1j)


# ----------------------------------------------------------------- states not from init

STATES_FROM_ELSEWHERE = {
    "None": None,
    "EmptyState": optax.EmptyState(),
    "adam": optax.adam(1e-3).init(jnp.ones(2)),
    "chain": optax.chain(alrc(), optax.sgd(1.0)).init(jnp.ones(2)),
    "dict": alrc().init(jnp.ones(2))._asdict(),
}
TRANSFORMS = {  # (transform, the name errors give it, the state type its init returns)
    "alrc": (alrc, "alrc", "ALRCState"),
    "alrc_grad_norm": (
        lambda: alrc(signal="grad_norm"),
        r'alrc\(signal="grad_norm"\)',
        "ALRCSignalsState",
    ),
    "alrc_per_example": (alrc_per_example, "alrc_per_example", "ALRCPerExampleState"),
}


@pytest.mark.parametrize("state", STATES_FROM_ELSEWHERE.values(), ids=STATES_FROM_ELSEWHERE)
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_state_not_from_init_is_refused_with_the_expected_type(name, state):
    make, shown, expected = TRANSFORMS[name]
    tx = make()
    got = "None" if state is None else type(state).__name__
    with pytest.raises(
        TypeError,
        match=rf"^{shown}: state must be the {expected} that this transform's init returns, "
        rf"got {got}\. Create it with opt_state = tx\.init\(params\)",
    ):
        tx.update(jnp.ones(2), state, value=jnp.ones(3) if name == "alrc_per_example" else 1.0)


@pytest.mark.parametrize(
    ("make", "make_other", "match"),
    [
        (alrc, lambda: alrc(signal="both"), r"^alrc: state must be the ALRCState .* got "),
        (
            lambda: alrc(signal="grad_norm"),
            lambda: alrc(signal="both"),
            r'^alrc\(signal="grad_norm"\): state\.loss must be an EmptyState, got ALRCState: '
            r'this is the state of alrc\(signal="both"\)',
        ),
        (
            lambda: alrc(signal="both"),
            lambda: alrc(signal="grad_norm"),
            r'^alrc\(signal="both"\): state\.loss must be an ALRCState, got EmptyState: '
            r'this is the state of alrc\(signal="grad_norm"\)',
        ),
        (
            spike_guard,
            lambda: spike_guard(signal="both"),
            r"^spike_guard: state\.loss must be an EmptyState, got ALRCState: this is the "
            r'state of spike_guard\(signal="both"\)\. Create the state with this transform\'s '
            r"init: opt_state = tx\.init\(params\)",
        ),
        (
            lambda: spike_guard(signal="both"),
            spike_guard,
            r'^spike_guard\(signal="both"\): state\.loss must be an ALRCState, got EmptyState: '
            r'this is the state of spike_guard\(signal="grad_norm"\)',
        ),
    ],
    ids=[
        "alrc<-both",
        "alrc_grad_norm<-both",
        "alrc_both<-grad_norm",
        "spike_guard<-both",
        "spike_guard_both<-default",
    ],
)
def test_the_state_of_another_signal_is_refused_naming_it(make, make_other, match):
    """The states of two signals differ only in what ``state.loss`` holds: the state of
    ``signal="both"`` given to the default signal would silently drop its loss statistics."""
    params = jnp.ones(2)
    with pytest.raises(TypeError, match=match):
        make().update(params, make_other().init(params), params, value=1.0)


# ----------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize("make", [alrc, alrc_per_example])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_stddev": 0.0}, "num_stddev"),
        ({"num_stddev": -1.0}, "num_stddev"),
        ({"num_stddev": np.nan}, "num_stddev"),
        ({"num_stddev": jnp.ones(2)}, "num_stddev"),
        ({"decay": 0.0}, "decay"),
        ({"decay": 1.0}, "decay"),
        ({"decay": 1.5}, "decay"),
        ({"mu1_init": 25.0}, "mu1_init and mu2_init"),
        ({"mu2_init": 900.0}, "mu1_init and mu2_init"),
        ({"mu1_init": 25.0, "mu2_init": 625.0}, "mu2_init must exceed"),
        ({"mu1_init": 25.0, "mu2_init": 100.0}, "mu2_init must exceed"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"signal": "norm"}, "signal must be one of"),
        ({"signal": "grad_norm", "mu1_init": 25.0, "mu2_init": 900.0}, 'signal="loss" only'),
    ],
)
def test_bad_signal_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        alrc(**kwargs)


def test_inject_hyperparams_matches_plain():
    """Traced hyperparameters (a static signal), and the paper's initial moments."""
    losses = noisy_training_losses(200, 7, noise=0.3)
    losses[[30, 90, 150]] *= 20.0
    grads = gradients_with_norms(spiky_norms(200, seed=7, spike_rate=0.05))
    injected = optax.inject_hyperparams(alrc, static_args=("signal",))
    for kwargs in ({"num_stddev": 2.5, "decay": 0.99}, {"num_stddev": 2.0, "signal": "both"}):
        got = run_gradients(injected(**kwargs), grads, losses)
        want = run_gradients(alrc(**kwargs), grads, losses)
        np.testing.assert_allclose(got["factor"], want["factor"], rtol=1e-6)
        assert np.any(want["factor"] < 1)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
            got["state"].inner_state,
            want["state"],
        )
    paper = {"mu1_init": 2.0, "mu2_init": 5.0}
    np.testing.assert_allclose(
        run_losses(optax.inject_hyperparams(alrc)(**paper), losses)["scale"],
        run_losses(alrc(**paper), losses)["scale"],
        rtol=1e-6,
    )


def test_bfloat16_hyperparameters_that_round_to_one_get_a_hint():
    tx = optax.inject_hyperparams(alrc)(decay=0.999)
    with pytest.raises(ValueError, match=r"hyperparam_dtype=jnp\.float32"):
        tx.init({"w": jnp.ones(2, jnp.bfloat16)})
    with pytest.raises(ValueError, match=r"hyperparam_dtype=jnp\.float32"):  # traced: no value
        jax.jit(tx.init)({"w": jnp.ones(2, jnp.bfloat16)})
    tx = optax.inject_hyperparams(alrc, hyperparam_dtype=jnp.float32)(decay=0.999)
    _, state = tx.update(jnp.ones(2), tx.init(jnp.ones(2, jnp.bfloat16)), value=1.0)
    assert np.isfinite(float(state.inner_state.mean))


def test_hyperparameters_can_change_between_steps():
    tx = optax.inject_hyperparams(alrc)(num_stddev=3.0)
    params = jnp.ones(2)
    state = tx.init(params)
    step = jax.jit(lambda s, v: tx.update(params, s, params, value=v))
    for loss in [1.0, 1.1, 0.9] * 10:
        _, state = step(state, loss)
    loose = float(state.inner_state.threshold)
    state.hyperparams["num_stddev"] = jnp.asarray(1.0)
    _, state = step(state, 1.0)
    assert float(state.inner_state.threshold) < loose


@pytest.mark.parametrize("signal", ["loss", "both"])
def test_jit_does_not_retrace_across_steps(signal):
    traces = []
    tx = optax.chain(alrc(signal=signal), optax.adam(1e-2))

    @jax.jit
    def step(params, state, loss):
        traces.append(1)
        updates, state = tx.update(params, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.ones(3), "b": jnp.ones((), jnp.bfloat16)}
    state = tx.init(params)
    for loss in [1.0, 2.0, 100.0, 1.5, np.nan, 1.0]:
        params, state = step(params, state, jnp.float32(loss))
    assert len(traces) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_shapes_and_dtypes_are_stable_inside_lax_cond(dtype):
    tx = optax.chain(alrc(), optax.adam(1e-2))
    params = {"w": jnp.ones((4, 3), dtype), "b": jnp.zeros((3,), dtype)}
    state = tx.init(params)

    @jax.jit
    def maybe_step(pred, state, loss):
        return jax.lax.cond(
            pred,
            lambda s: tx.update(params, s, params, value=loss),
            lambda s: (params, s),
            state,
        )

    for pred, loss in [(True, 1.0), (False, 2.0), (True, 3.0)]:
        _, new_state = maybe_step(pred, state, jnp.asarray(loss, dtype))
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        state = new_state


# ----------------------------------------------------------------- per-example ALRC

DIM = 4


def example_losses(params, inputs, targets):
    """Squared error of a linear model, one loss per example (any leading shape)."""
    return jnp.square(inputs @ params - targets)


def capped_mean_loss(params, opt_state, inputs, targets):
    """The mean of the ALRC-capped per-example losses, and the raw losses."""
    losses = example_losses(params, inputs, targets)
    return cap_losses(losses, opt_state).mean(), losses


grad_capped = jax.jit(jax.value_and_grad(capped_mean_loss, has_aux=True))


class PaperReference:
    """The paper's per-example rule in float64 numpy, written from its description."""

    def __init__(self, num_stddev, decay, mu1, mu2):
        self.num_stddev, self.decay, self.mu1, self.mu2 = num_stddev, decay, mu1, mu2

    def threshold(self):
        return self.mu1 + self.num_stddev * np.sqrt(self.mu2 - self.mu1**2 + 1e-8)

    def step(self, losses, per_example_grads):
        """Caps each loss; returns (threshold, capped losses, gradient of their mean)."""
        threshold = self.threshold()
        factors = np.where(losses > threshold, threshold / losses, 1.0)
        capped = losses * factors
        grad_axes = tuple(range(losses.ndim))
        grad = np.tensordot(factors, per_example_grads, axes=(grad_axes, grad_axes))
        grad /= losses.size
        self.mu1 = self.decay * self.mu1 + (1 - self.decay) * np.mean(capped)
        self.mu2 = self.decay * self.mu2 + (1 - self.decay) * np.mean(capped**2)
        return threshold, capped, grad


def random_batch(rng, shape, spike_prob=0.02):
    """Inputs and targets whose squared errors have heavy spikes now and then."""
    inputs = rng.normal(size=(*shape, DIM)).astype(np.float32)
    noise = rng.normal(size=shape) * np.where(rng.random(shape) < spike_prob, 30.0, 1.0)
    targets = (inputs @ np.arange(1.0, DIM + 1) + noise).astype(np.float32)
    return inputs, targets


def reference_gradients(params, inputs, targets):
    """Float64 per-example gradients of the squared errors, from the same float32 inputs."""
    x, y, w = (np.asarray(a, np.float64) for a in (inputs, targets, params))
    return 2 * (x @ w - y)[..., None] * x


@pytest.mark.parametrize(
    ("shape", "num_steps", "seed"),
    [((16,), 300, 0), ((8, 5), 60, 1)],
    ids=["per_example", "per_token"],
)
def test_per_example_matches_the_paper_reference(shape, num_steps, seed):
    num_stddev, decay, mu1, mu2 = 2.0, 0.9, 4.0, 40.0
    tx = alrc_per_example(num_stddev, decay, mu1_init=mu1, mu2_init=mu2)
    update = jax.jit(tx.update)
    reference = PaperReference(num_stddev, decay, mu1, mu2)
    rng = np.random.default_rng(seed)
    params = jnp.zeros(DIM) + jnp.arange(1.0, DIM + 1) * 0.9  # a slightly wrong model
    opt_state = tx.init(params)
    total_clipped = num_undecided = 0
    for _ in range(num_steps):
        inputs, targets = random_batch(rng, shape)
        (loss, losses), grads = grad_capped(params, opt_state, inputs, targets)
        capped = cap_losses(losses, opt_state)
        ref_losses = np.asarray(losses, np.float64)  # the rule's input: the model's losses
        ref_grads = reference_gradients(params, inputs, targets)
        ref_threshold, ref_capped, ref_grad = reference.step(ref_losses, ref_grads)
        np.testing.assert_allclose(opt_state.losses.threshold, ref_threshold, rtol=2e-5)
        # Clip decisions must agree unless a loss is within float32 rounding of the cap
        # (there both sides' capped values agree to the tolerance anyway).
        decided = np.abs(ref_losses - ref_threshold) > 1e-4 * ref_threshold
        num_undecided += int((~decided).sum())
        np.testing.assert_array_equal(
            (np.asarray(capped) < losses)[decided], (ref_capped < ref_losses)[decided]
        )
        np.testing.assert_allclose(capped, ref_capped, rtol=1e-4)
        np.testing.assert_allclose(loss, ref_capped.mean(), rtol=2e-5)
        np.testing.assert_allclose(grads, ref_grad, rtol=1e-4, atol=1e-5)
        updates, opt_state = update(grads, opt_state, params, value=losses)
        np.testing.assert_array_equal(updates, grads)  # per-example ALRC acts in the loss
        total_clipped += int((np.asarray(capped) < losses).sum())
    stats = opt_state.losses
    np.testing.assert_allclose(stats.mean, reference.mu1, rtol=2e-5)
    np.testing.assert_allclose(stats.var, reference.mu2 - reference.mu1**2, rtol=1e-4)
    assert int(stats.num_clipped) == total_clipped
    assert num_undecided <= 2  # the comparison above covers (almost) every example
    assert int(stats.num_losses) == num_steps * int(np.prod(shape))
    assert 0 < total_clipped < 0.2 * num_steps * np.prod(shape)  # spikes capped, not the rest


def warmed_up_state(tx, params, rng, num_steps=50, batch=32):
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(num_steps):
        inputs, targets = random_batch(rng, (batch,), spike_prob=0.0)
        losses = example_losses(params, inputs, targets)
        _, opt_state = update(jax.tree.map(jnp.zeros_like, params), opt_state, value=losses)
    return opt_state


def test_one_corrupted_example_is_damped_the_other_31_untouched():
    tx = alrc_per_example()
    params = jnp.arange(1.0, DIM + 1) * 0.9
    rng = np.random.default_rng(2)
    opt_state = warmed_up_state(tx, params, rng)
    inputs, targets = random_batch(rng, (32,), spike_prob=0.0)
    targets[7] += 1000.0  # one corrupted label
    raw_rows = jax.jacrev(example_losses)(params, inputs, targets)
    capped_rows = jax.jacrev(lambda p: cap_losses(example_losses(p, inputs, targets), opt_state))(
        params
    )
    clean = np.arange(32) != 7
    np.testing.assert_array_equal(capped_rows[clean], raw_rows[clean])  # exactly, bit for bit
    losses = example_losses(params, inputs, targets)
    threshold = opt_state.losses.threshold
    assert losses[clean].max() < threshold < losses[7]
    np.testing.assert_allclose(capped_rows[7], raw_rows[7] * threshold / losses[7], rtol=1e-6)
    assert np.linalg.norm(capped_rows[7]) < 0.01 * np.linalg.norm(raw_rows[7])
    (loss, _), grads = jax.value_and_grad(capped_mean_loss, has_aux=True)(
        params, opt_state, inputs, targets
    )
    np.testing.assert_allclose(grads, capped_rows.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, threshold / 32 + losses[clean].sum() / 32, rtol=1e-6)
    _, new_state = tx.update(grads, opt_state, params, value=losses)
    assert int(new_state.losses.num_clipped) - int(opt_state.losses.num_clipped) == 1


def clip_pattern(loss_scale):
    """Which losses are capped at each step of a spiky sequence scaled by ``loss_scale``."""
    tx = alrc_per_example()
    update = jax.jit(tx.update)
    rng = np.random.default_rng(3)
    opt_state = tx.init(jnp.zeros(1))
    pattern = []
    for _ in range(80):
        base = rng.lognormal(0.0, 0.3, size=16) * np.where(rng.random(16) < 0.03, 50.0, 1.0)
        losses = jnp.asarray(base * loss_scale, jnp.float32)
        pattern.append(np.asarray(cap_losses(losses, opt_state) < losses))
        _, opt_state = update(jnp.zeros(1), opt_state, value=losses)
    return np.stack(pattern), opt_state.losses


def test_per_example_capping_does_not_depend_on_the_units_of_the_loss():
    pattern, stats = clip_pattern(1.0)
    assert pattern.sum() > 5  # the spikes after the first steps are capped
    assert pattern[0].sum() == 0  # no cap before any statistics
    for loss_scale in (1e-5, 1e5):
        scaled_pattern, scaled_stats = clip_pattern(loss_scale)
        np.testing.assert_array_equal(scaled_pattern, pattern)
        assert int(scaled_stats.num_clipped) == int(stats.num_clipped)
        np.testing.assert_allclose(scaled_stats.threshold / loss_scale, stats.threshold, rtol=1e-4)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_example_zeroes_the_updates_and_keeps_the_statistics(bad):
    tx = optax.chain(alrc_per_example(), optax.sgd(0.1))
    params = jnp.arange(1.0, DIM + 1) * 0.9
    rng = np.random.default_rng(4)
    opt_state = warmed_up_state(tx, params, rng, num_steps=10)
    inputs, targets = random_batch(rng, (32,), spike_prob=0.0)
    targets[5] = bad
    (_, losses), grads = jax.value_and_grad(capped_mean_loss, has_aux=True)(
        params, opt_state, inputs, targets
    )
    assert not np.all(np.isfinite(grads))
    updates, new_state = jax.jit(tx.update)(grads, opt_state, params, value=losses)
    np.testing.assert_array_equal(updates, np.zeros(DIM))
    old, new = opt_state[0].losses, new_state[0].losses
    assert_statistics_equal(new, old)
    assert int(new.num_nonfinite) == int(old.num_nonfinite) + 1
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(new_state))


def test_per_example_training_with_logadam_under_jit_matches_eager():
    tx = optax.chain(alrc_per_example(), logadam(0.05))

    def train_step(params, opt_state, inputs, targets):
        (_, losses), grads = jax.value_and_grad(capped_mean_loss, has_aux=True)(
            params, opt_state, inputs, targets
        )
        updates, opt_state = tx.update(grads, opt_state, params, value=losses)
        return optax.apply_updates(params, updates), opt_state

    jit_step = jax.jit(train_step)
    rng = np.random.default_rng(5)
    params = jnp.zeros(DIM)
    eager = (params, tx.init(params))
    jitted = (params, tx.init(params))
    for step in range(150):
        inputs, targets = random_batch(rng, (32,), spike_prob=0.03)
        if step < 30:  # eager steps are slow: compare the first 30
            eager = train_step(*eager, inputs, targets)
        jitted = jit_step(*jitted, inputs, targets)
        if step == 29:
            np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-4, atol=1e-5)
            assert int(jitted[1][0].losses.num_clipped) == int(eager[1][0].losses.num_clipped) > 0
    stats = jitted[1][0].losses
    assert int(stats.num_clipped) > 10
    np.testing.assert_allclose(jitted[0], np.arange(1.0, DIM + 1), atol=0.2)  # it learned


@pytest.mark.parametrize(
    "value", [1.0, jnp.float32(2.0), jnp.ones(())], ids=["float", "float32", "0-d array"]
)
def test_a_scalar_value_is_refused_it_needs_per_example_losses(value):
    tx = alrc_per_example()
    with pytest.raises(
        ValueError,
        match=r"alrc_per_example expects value to be the per-example losses, shape \(batch,\) "
        r"or \(batch, \.\.\.\), got a scalar.*use alrc\(\)",
    ):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)), value=value)


def test_an_empty_batch_of_losses_is_refused():
    tx = alrc_per_example()
    with pytest.raises(ValueError, match=r"alrc_per_example: value holds no losses"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)), value=jnp.ones((0,)))


def test_the_per_example_state_holds_an_alrc_state_in_a_type_of_its_own():
    """Its own type is how cap_losses tells it from batch ALRC's, before any step."""
    state = alrc_per_example().init(jnp.ones(2))
    assert type(state) is ALRCPerExampleState and type(state.losses) is ALRCState
    assert ALRCPerExampleState._fields == ("losses",)
    tx = optax.chain(alrc_per_example(), optax.sgd(0.1))
    _, new_state = jax.jit(tx.update)(jnp.ones(2), tx.init(jnp.ones(2)), value=jnp.ones(3))
    assert type(new_state[0]) is ALRCPerExampleState and type(new_state[0].losses) is ALRCState


# ----------------------------------------------------------------- cap_losses


def test_cap_losses_with_a_state_or_a_threshold():
    tx = alrc_per_example(mu1_init=1.0, mu2_init=1.25)  # threshold 1 + 3 * 0.5 = 2.5
    state = tx.init(jnp.zeros(2))
    losses = jnp.asarray([1.0, 2.0, 10.0, -4.0], jnp.bfloat16)
    for source in (state, state.losses.threshold, 2.5, np.float32(2.5)):
        capped = cap_losses(losses, source)
        assert capped.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(capped, np.float32), [1.0, 2.0, 2.5, -4.0])


def test_cap_losses_finds_the_state_under_inject_hyperparams_and_multisteps():
    inner = optax.inject_hyperparams(alrc_per_example)(num_stddev=3.0)
    tx = optax.MultiSteps(optax.chain(inner, optax.sgd(0.1)), every_k_schedule=1)
    params = jnp.ones(DIM)
    opt_state = tx.init(params)
    losses = jnp.array([1.0, 2.0, 3.0])
    _, opt_state = tx.update(jnp.zeros(DIM), opt_state, params, value=losses)
    threshold = optax.tree.get(opt_state, "threshold")
    assert np.isfinite(threshold)
    capped = cap_losses(jnp.array([1.0, 1e6]), opt_state)
    np.testing.assert_allclose(capped, [1.0, threshold], rtol=1e-6)


def test_cap_losses_finds_the_per_example_state_next_to_batch_ones():
    tx = optax.chain(alrc(signal="grad_norm"), alrc(), alrc_per_example(mu1_init=1.0, mu2_init=2.0))
    opt_state = tx.init(jnp.ones(2))
    threshold = float(opt_state[2].losses.threshold)
    np.testing.assert_allclose(cap_losses(jnp.array([1.0, 1e6]), opt_state), [1.0, threshold])


def test_cap_losses_needs_exactly_one_per_example_state():
    tx = optax.chain(alrc_per_example(), alrc_per_example())
    with pytest.raises(ValueError, match=r"exactly one ALRCPerExampleState.* found 2"):
        cap_losses(jnp.ones(3), tx.init(jnp.ones(2)))
    with pytest.raises(ValueError, match=r"found no ALRCPerExampleState.*alrc_per_example\(\)"):
        cap_losses(jnp.ones(3), optax.adam(1e-3).init(jnp.ones(2)))


@pytest.mark.parametrize(
    "make",
    [alrc, lambda: optax.chain(alrc(), logadam(1e-3)), lambda: alrc(signal="both")],
    ids=["alrc", "chain", "both"],
)
def test_cap_losses_refuses_the_state_of_batch_alrc(make):
    """Batch ALRC's statistics are of batch means, fed in update: capping each example
    at their threshold (and scaling the step again in update) is not per-example ALRC."""
    with pytest.raises(
        ValueError,
        match=r"cap_losses needs the state of alrc_per_example\(\).*holds only the state of "
        r"batch alrc\(\)",
    ):
        cap_losses(jnp.ones(3), make().init(jnp.ones(2)))

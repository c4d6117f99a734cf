"""Per-example ALRC (``alrc_per_example`` + ``cap_losses``) against the paper's rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp import (
    ALRCPerExampleState,
    ALRCState,
    alrc,
    alrc_per_example,
    cap_losses,
    logadam,
)

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


def run_against_reference(shape, num_steps, seed):
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
        np.testing.assert_allclose(opt_state.threshold, ref_threshold, rtol=2e-5)
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
    np.testing.assert_allclose(opt_state.mean, reference.mu1, rtol=2e-5)
    np.testing.assert_allclose(opt_state.var, reference.mu2 - reference.mu1**2, rtol=1e-4)
    assert int(opt_state.num_clipped) == total_clipped
    assert num_undecided <= 2  # the comparison above covers (almost) every example
    assert int(opt_state.num_losses) == num_steps * int(np.prod(shape))
    return total_clipped


def test_matches_paper_reference_over_many_batches():
    total_clipped = run_against_reference(shape=(16,), num_steps=300, seed=0)
    assert 30 < total_clipped < 0.2 * 300 * 16  # the spikes are capped, ordinary losses not


def test_per_token_losses_match_reference():
    total_clipped = run_against_reference(shape=(8, 5), num_steps=60, seed=1)
    assert total_clipped > 0


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
    threshold = opt_state.threshold
    assert losses[clean].max() < threshold < losses[7]
    np.testing.assert_allclose(capped_rows[7], raw_rows[7] * threshold / losses[7], rtol=1e-6)
    assert np.linalg.norm(capped_rows[7]) < 0.01 * np.linalg.norm(raw_rows[7])
    (loss, _), grads = jax.value_and_grad(capped_mean_loss, has_aux=True)(
        params, opt_state, inputs, targets
    )
    np.testing.assert_allclose(grads, capped_rows.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, threshold / 32 + losses[clean].sum() / 32, rtol=1e-6)
    _, new_state = tx.update(grads, opt_state, params, value=losses)
    assert int(new_state.num_clipped) - int(opt_state.num_clipped) == 1


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
    return np.stack(pattern), opt_state


def test_default_mode_is_scale_invariant():
    pattern, state = clip_pattern(1.0)
    assert pattern.sum() > 5  # the spikes after the first steps are capped
    assert pattern[0].sum() == 0  # no cap before any statistics
    for loss_scale in (1e-5, 1e5):
        scaled_pattern, scaled_state = clip_pattern(loss_scale)
        np.testing.assert_array_equal(scaled_pattern, pattern)
        assert int(scaled_state.num_clipped) == int(state.num_clipped)
        np.testing.assert_allclose(scaled_state.threshold / loss_scale, state.threshold, rtol=1e-4)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_example_zeroes_updates_and_keeps_statistics(bad):
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
    old, new = opt_state[0], new_state[0]
    for field in ("count", "mean", "var", "threshold", "num_steps", "num_losses", "num_clipped"):
        np.testing.assert_array_equal(getattr(new, field), getattr(old, field), err_msg=field)
    assert int(new.num_nonfinite) == int(old.num_nonfinite) + 1
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(new_state))


def make_train_step(tx):
    def train_step(params, opt_state, inputs, targets):
        (loss, losses), grads = jax.value_and_grad(capped_mean_loss, has_aux=True)(
            params, opt_state, inputs, targets
        )
        updates, opt_state = tx.update(grads, opt_state, params, value=losses)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def test_training_with_logadam_under_jit_matches_eager():
    tx = optax.chain(alrc_per_example(), logadam(0.05))
    eager_step = make_train_step(tx)
    jit_step = jax.jit(eager_step)
    rng = np.random.default_rng(5)
    params = jnp.zeros(DIM)
    eager = (params, tx.init(params))
    jitted = (params, tx.init(params))
    for step in range(150):
        inputs, targets = random_batch(rng, (32,), spike_prob=0.03)
        if step < 30:  # eager steps are slow: compare the first 30
            eager = eager_step(*eager, inputs, targets)[:2]
        jitted = jit_step(*jitted, inputs, targets)[:2]
        if step == 29:
            np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-4, atol=1e-5)
            assert int(jitted[1][0].num_clipped) == int(eager[1][0].num_clipped) > 0
    alrc_state = jitted[1][0]
    assert isinstance(alrc_state, ALRCState)
    assert int(alrc_state.num_clipped) > 10
    np.testing.assert_allclose(jitted[0], np.arange(1.0, DIM + 1), atol=0.2)  # it learned


def test_cap_losses_finds_state_under_inject_hyperparams_and_multisteps():
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


def test_cap_losses_needs_exactly_one_state():
    tx = optax.chain(alrc_per_example(), alrc_per_example())
    with pytest.raises(ValueError, match=r"exactly one ALRCPerExampleState.* found 2"):
        cap_losses(jnp.ones(3), tx.init(jnp.ones(2)))


@pytest.mark.parametrize(
    "make",
    [lambda: alrc(), lambda: optax.chain(alrc(), logadam(1e-3)), lambda: alrc(signal="both")],
    ids=["alrc", "chain", "both"],
)
def test_cap_losses_refuses_the_state_of_batch_alrc(make):
    """Batch ALRC's statistics are of batch means, fed in update: capping each example
    at their threshold (and scaling the step again in update) is not per-example ALRC."""
    opt_state = make().init(jnp.ones(2))
    with pytest.raises(
        ValueError,
        match=r"cap_losses needs the state of alrc_per_example\(\).*holds only the state of "
        r"batch alrc\(\)",
    ):
        cap_losses(jnp.ones(3), opt_state)
    bare = opt_state if isinstance(opt_state, ALRCState) else None
    if bare is not None:  # the state itself, not only an optimizer state that holds it
        with pytest.raises(ValueError, match=r"holds only the state of batch alrc\(\)"):
            cap_losses(jnp.ones(3), bare)


def test_cap_losses_finds_the_per_example_state_next_to_a_batch_one():
    tx = optax.chain(alrc(signal="grad_norm"), alrc(), alrc_per_example(mu1_init=1.0, mu2_init=2.0))
    opt_state = tx.init(jnp.ones(2))
    threshold = float(opt_state[2].threshold)
    np.testing.assert_allclose(cap_losses(jnp.array([1.0, 1e6]), opt_state), [1.0, threshold])
    assert type(opt_state[2]) is ALRCPerExampleState and type(opt_state[1]) is ALRCState


def test_cap_losses_with_no_alrc_state_says_what_to_build():
    with pytest.raises(ValueError, match=r"found no ALRCPerExampleState.*alrc_per_example\(\)"):
        cap_losses(jnp.ones(3), optax.adam(1e-3).init(jnp.ones(2)))


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


@pytest.mark.parametrize(
    "state",
    [None, optax.EmptyState(), alrc().init(jnp.ones(2))],
    ids=["None", "EmptyState", "batch_alrc"],
)
def test_a_state_not_from_init_is_refused_with_the_expected_type(state):
    tx = alrc_per_example()
    with pytest.raises(
        TypeError,
        match=r"alrc_per_example: state must be the ALRCPerExampleState that this transform's "
        r"init returns.*tx\.init\(params\)",
    ):
        tx.update(jnp.ones(2), state, value=jnp.ones(3))


def test_a_value_that_is_not_a_number_names_value():
    tx = alrc_per_example()
    with pytest.raises(TypeError, match=r"alrc_per_example: value must be a real loss"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)), value=["1.0", "2.0"])


def test_the_state_is_an_alrc_state_of_its_own_type():
    """Its own type is how cap_losses tells it from batch ALRC's, before any step."""
    state = alrc_per_example().init(jnp.ones(2))
    assert type(state) is ALRCPerExampleState and isinstance(state, ALRCState)
    assert state._fields == ALRCState._fields  # the same fields: the same checkpoints
    tx = optax.chain(alrc_per_example(), optax.sgd(0.1))
    _, new_state = jax.jit(tx.update)(jnp.ones(2), tx.init(jnp.ones(2)), value=jnp.ones(3))
    assert type(new_state[0]) is ALRCPerExampleState

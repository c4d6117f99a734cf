"""logadam: log dampening chained into Adam (SPEC 1.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp import log_dampen, logadam, logadamw


def run(tx, num_steps=8, dtype=jnp.float32):
    params = {"w": jnp.linspace(-1, 1, 12, dtype=dtype).reshape(3, 4), "b": jnp.ones(4, dtype)}
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p, value=jnp.float32(1.0)))
    for i in range(num_steps):
        magnitude = 10.0 ** (i % 4)
        grads = jax.tree.map(lambda p, m=magnitude: (p * m + 0.3).astype(p.dtype), params)
        updates, state = step(params, state, grads)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"b1": 0.8, "b2": 0.99, "eps": 1e-6, "eps_root": 1e-10},
        {"nesterov": True},
        {"mu_dtype": jnp.bfloat16},
        {"dampen_scale": 0.01},
    ],
)
def test_equals_chain_of_log_dampen_and_adam(kwargs):
    scale = kwargs.pop("dampen_scale", 1.0)
    got = run(logadam(1e-2, dampen_scale=scale, **kwargs))
    expected = run(optax.chain(log_dampen(scale), optax.adam(1e-2, **kwargs)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, expected)


def test_learning_rate_schedule():
    schedule = optax.linear_schedule(1e-2, 1e-4, 8)
    got = run(logadam(schedule))
    expected = run(optax.chain(log_dampen(), optax.adam(schedule)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)
    assert not np.allclose(run(logadam(1e-2))["b"], got["b"])


def test_inject_hyperparams_and_bfloat16_params():
    # float32 hyperparameters: in bfloat16, b2 = 0.999 rounds to 1 and optax.adam itself
    # divides by zero (inject_hyperparams casts them to the parameter dtype by default).
    tx = optax.inject_hyperparams(logadam, hyperparam_dtype=jnp.float32)(
        learning_rate=1e-2, dampen_scale=0.5
    )
    got = run(tx, dtype=jnp.bfloat16)
    expected = run(logadam(1e-2, dampen_scale=0.5), dtype=jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2)


def test_is_extra_args_and_differs_from_plain_adam():
    tx = logadam(1e-2)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    assert not np.allclose(run(tx)["w"], run(optax.adam(1e-2))["w"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dampen_scale": 0.0}, r"^dampen_scale must be a finite number > 0"),
        ({"dampen_scale": 1e30}, r"^dampen_scale must lie in \[1e-20, 1e\+20\]"),
        ({"b1": 1.0}, r"^b1 must lie in \[0, 1\)"),
        ({"b2": 1.0}, r"^b2 must lie in \[0, 1\)"),
        ({"b2": -0.1}, r"^b2 must lie in \[0, 1\)"),
    ],
)
def test_bad_arguments_are_refused_under_their_own_names(kwargs, match):
    with pytest.raises(ValueError, match=match):
        logadam(1e-3, **kwargs)


@pytest.mark.parametrize("jit_init", [False, True], ids=["eager_init", "jitted_init"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_inject_hyperparams_with_half_precision_params_is_refused_not_nan(dtype, jit_init):
    """Half-precision params give half-precision hyperparameters: b2 = 0.999 becomes 1
    in bfloat16 (Adam divides by zero) and eps = 1e-8 becomes 0 in float16 (0 / 0 for a
    zero gradient). Refused even when ``init`` is traced and no value can be read."""
    tx = optax.inject_hyperparams(logadam)(learning_rate=1e-2)
    params = {"w": jnp.ones(3, dtype)}
    init = jax.jit(tx.init) if jit_init else tx.init
    with pytest.raises(ValueError, match=r"hyperparam_dtype=jnp\.float32"):
        init(params)
    tx = optax.inject_hyperparams(logadam, hyperparam_dtype=jnp.float32)(learning_rate=1e-2)
    updates, _ = jax.jit(tx.update)(params, jax.jit(tx.init)(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"], np.float32)))


def run_bitwise(tx, num_steps=12):
    """Params and state leaves after jitted steps with spikes (x1e4 every fifth step)."""
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.ones(4), "ln": jnp.ones(4)}
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for i in range(num_steps):
        spike = 1e4 if i % 5 == 4 else 1.0
        grads = jax.tree.map(lambda p, i=i, m=spike: m * (jnp.sin(p * (i + 1)) + 0.1), params)
        updates, state = step(params, state, grads)
        params = optax.apply_updates(params, updates)
    return params, jax.tree.leaves(state)


@pytest.mark.parametrize("dampen_scale", [1.0, 0.01, "auto"])
def test_logadamw_is_bitwise_the_chain_of_log_dampen_and_adamw(dampen_scale):
    """With a decay mask (not on biases and norms) and schedules for the rate and decay."""
    mask = lambda params: {name: name == "w" for name in params}  # noqa: E731
    kwargs = {
        "learning_rate": optax.cosine_decay_schedule(1e-2, 12),
        "b2": 0.95,
        "weight_decay": optax.linear_schedule(0.1, 0.01, 12),
        "mask": mask,
    }
    got_params, got_state = run_bitwise(logadamw(dampen_scale=dampen_scale, **kwargs))
    want_params, want_state = run_bitwise(
        optax.chain(log_dampen(dampen_scale), optax.adamw(**kwargs))
    )
    jax.tree.map(np.testing.assert_array_equal, got_params, want_params)
    assert len(got_state) == len(want_state)
    for got, want in zip(got_state, want_state, strict=True):
        np.testing.assert_array_equal(got, want)
    # The mask matters and the dampening matters: neither side is a no-op.
    unmasked, _ = run_bitwise(logadamw(dampen_scale=dampen_scale, **{**kwargs, "mask": None}))
    assert not np.array_equal(unmasked["b"], got_params["b"])
    np.testing.assert_array_equal(unmasked["w"], got_params["w"])
    plain, _ = run_bitwise(optax.adamw(**kwargs))
    assert not np.array_equal(plain["w"], got_params["w"])


def test_logadamw_refuses_bad_arguments_under_their_own_names():
    with pytest.raises(ValueError, match=r"^dampen_scale must be a finite number > 0"):
        logadamw(1e-3, dampen_scale=-1.0)
    with pytest.raises(ValueError, match=r'^dampen_scale must be a number or "auto"'):
        logadamw(1e-3, dampen_scale="Auto")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match=r"^b2 must lie in \[0, 1\)"):
        logadamw(1e-3, b2=1.0)

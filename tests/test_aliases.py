"""logadam and logadamw (``_aliases.py``): log dampening chained into Adam and AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_logdamp import LogDampenState, log_dampen, logadam, logadamw

NUM_STEPS = 12
WEIGHTS_ONLY = lambda params: {name: name == "w" for name in params}  # noqa: E731


def run(tx, dtype=jnp.float32, num_steps=NUM_STEPS):
    """Params and state leaves after jitted steps with spikes (x1e4 every fifth step)."""
    params = {
        "w": jnp.linspace(-1, 1, 12, dtype=dtype).reshape(3, 4),
        "b": jnp.ones(4, dtype),
        "ln": jnp.ones(4, dtype),
    }
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for i in range(num_steps):
        spike = 1e4 if i % 5 == 4 else 1.0
        grads = jax.tree.map(
            lambda p, i=i, m=spike: (m * (jnp.sin(p * (i + 1)) + 0.1)).astype(p.dtype), params
        )
        updates, state = step(params, state, grads)
        params = optax.apply_updates(params, updates)
    return params, jax.tree.leaves(state)


SCHEDULE = optax.cosine_decay_schedule(1e-2, NUM_STEPS)
ADAMW = {
    "learning_rate": SCHEDULE,
    "b2": 0.95,
    "weight_decay": optax.linear_schedule(0.1, 0.01, NUM_STEPS),
    "mask": WEIGHTS_ONLY,
}
# (alias, its keyword arguments, the params' dtype); the chain takes the same arguments
# (without dampen_scale) through optax.adam or optax.adamw.
CASES = {
    "default": (logadam, {}, jnp.float32),
    "scale": (logadam, {"dampen_scale": 0.01}, jnp.float32),
    "auto": (logadam, {"dampen_scale": "auto"}, jnp.float32),
    "betas_eps": (
        logadam,
        {"b1": 0.5, "b2": 0.9, "eps": 1e-6, "eps_root": 1e-12, "dampen_scale": 4.0},
        jnp.float32,
    ),
    "nesterov": (logadam, {"nesterov": True, "dampen_scale": 0.05}, jnp.float32),
    "schedule": (logadam, {"learning_rate": SCHEDULE}, jnp.float32),
    "bfloat16_mu_dtype": (logadam, {"mu_dtype": jnp.bfloat16}, jnp.bfloat16),
    "bfloat16_auto": (logadam, {"dampen_scale": "auto"}, jnp.bfloat16),
    "adamw": (logadamw, ADAMW, jnp.float32),
    "adamw_scale": (logadamw, {**ADAMW, "dampen_scale": 0.01}, jnp.float32),
    "adamw_auto": (logadamw, {**ADAMW, "dampen_scale": "auto"}, jnp.float32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_equals_the_chain_of_log_dampen_and_optax_bitwise(name):
    """logadam is chain(log_dampen(s), adam), logadamw chain(log_dampen(s), adamw): the
    params and every state leaf agree bit for bit, spikes, schedules and masks included."""
    alias, kwargs, dtype = CASES[name]
    kwargs = {"learning_rate": 1e-2, **kwargs}
    options = {key: value for key, value in kwargs.items() if key != "dampen_scale"}
    scale = kwargs.get("dampen_scale", 1.0)
    optimizer = optax.adamw if alias is logadamw else optax.adam
    got_params, got_state = run(alias(**kwargs), dtype)
    want_params, want_state = run(optax.chain(log_dampen(scale), optimizer(**options)), dtype)
    jax.tree.map(np.testing.assert_array_equal, got_params, want_params)
    assert len(got_state) == len(want_state) > 0
    for got, want in zip(got_state, want_state, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(got_params))


def test_the_dampening_the_schedule_and_the_mask_each_matter():
    """Neither side of the equality above is a no-op."""
    params, _ = run(logadam(1e-2))
    assert not np.array_equal(params["w"], run(optax.adam(1e-2))[0]["w"])
    assert not np.array_equal(params["b"], run(logadam(SCHEDULE))[0]["b"])
    masked, _ = run(logadamw(**ADAMW))
    unmasked, _ = run(logadamw(**{**ADAMW, "mask": None}))
    assert not np.array_equal(unmasked["b"], masked["b"])
    np.testing.assert_array_equal(unmasked["w"], masked["w"])


@pytest.mark.parametrize("alias", [logadam, logadamw])
def test_is_extra_args_with_the_dampening_state_first(alias):
    tx = alias(1e-2, dampen_scale="auto")
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    state = tx.init({"w": jnp.ones(3)})
    assert isinstance(state[0], LogDampenState)
    updates, _ = tx.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(3)}, value=1.0, rng=0)
    assert updates["w"].shape == (3,)


def test_inject_hyperparams_with_float32_hyperparams_and_bfloat16_params():
    # float32 hyperparameters: in bfloat16, b2 = 0.999 rounds to 1 and optax.adam itself
    # divides by zero (inject_hyperparams casts them to the parameter dtype by default).
    tx = optax.inject_hyperparams(logadam, hyperparam_dtype=jnp.float32)(
        learning_rate=1e-2, dampen_scale=0.5
    )
    got, _ = run(tx, dtype=jnp.bfloat16, num_steps=8)
    want, _ = run(logadam(1e-2, dampen_scale=0.5), dtype=jnp.bfloat16, num_steps=8)
    for name in want:
        assert got[name].dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(got[name], np.float32), np.asarray(want[name], np.float32), rtol=1e-2
        )


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


@pytest.mark.parametrize("alias", [logadam, logadamw])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dampen_scale": 0.0}, r"^dampen_scale must be a finite number > 0"),
        ({"dampen_scale": -1.0}, r"^dampen_scale must be a finite number > 0"),
        ({"dampen_scale": 1e30}, r"^dampen_scale must lie in \[1e-20, 1e\+20\]"),
        ({"dampen_scale": "Auto"}, r'^dampen_scale must be a number or "auto"'),
        ({"b1": 1.0}, r"^b1 must lie in \[0, 1\)"),
        ({"b2": 1.0}, r"^b2 must lie in \[0, 1\)"),
        ({"b2": -0.1}, r"^b2 must lie in \[0, 1\)"),
        ({"eps": jnp.float16(1e-8)}, r"^eps must be float32 or wider"),
    ],
)
def test_bad_arguments_are_refused_under_their_own_names(alias, kwargs, match):
    with pytest.raises(ValueError, match=match):
        alias(1e-3, **kwargs)

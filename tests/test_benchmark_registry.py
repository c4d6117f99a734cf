"""One registry of contenders (``benchmarks/contenders.py``) for every benchmark.

Every name a benchmark runs is a registry name, and every registry entry builds an
optimizer that trains: a name means the same optimizer in every script and table.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import natural_spikes  # noqa: E402
import spike_benchmark  # noqa: E402
import step_overhead  # noqa: E402

import optax_logdamp as old  # noqa: E402

import flower_gan  # noqa: E402
import lm_spike_benchmark  # noqa: E402
import supersampling  # noqa: E402
from contenders import REGISTRY, Base, build, contender, split_names  # noqa: E402


def benchmark_names() -> dict[str, set[str]]:
    lm = {
        name
        for plans in lm_spike_benchmark.PLANS.values()
        for plan in plans.values()
        for name, _ in plan
    }
    overhead = {c.name for c in step_overhead.contenders()} - set(step_overhead.MEASUREMENTS)
    return {
        "lm": lm,
        "digits": set(spike_benchmark.CONTENDERS),
        "step_overhead": overhead,
        "papers": set(supersampling.CONTENDERS) | set(flower_gan.CONTENDERS),
        "natural_spikes": set(natural_spikes.CONTENDERS),
    }


@pytest.mark.parametrize("benchmark", ["lm", "digits", "step_overhead", "papers", "natural_spikes"])
def test_every_benchmark_uses_registry_names(benchmark):
    names = benchmark_names()[benchmark]
    assert names, benchmark
    assert names <= set(REGISTRY), sorted(names - set(REGISTRY))


def test_every_registry_name_survives_the_comma_separated_flags():
    """--contenders / --only split on commas outside parentheses: each name comes back whole."""
    names = list(REGISTRY)
    assert split_names(",".join(names)) == names
    assert split_names(" spike_guard , alrc(both) + log_dampen(auto),") == [
        "spike_guard",
        "alrc(both) + log_dampen(auto)",
    ]
    assert split_names("a(b, c),d") == ["a(b, c)", "d"]  # a comma inside parentheses stays


def test_an_unknown_name_lists_the_registry():
    with pytest.raises(KeyError, match=r"no contender 'adam'.*spike_guard"):
        contender("adam")


RECIPES = {
    "adam": Base(1e-3),
    "standard": Base(
        optax.warmup_cosine_decay_schedule(0.0, 3e-3, 5, 50, 3e-4),
        b2=0.95,
        weight_decay=0.1,
        clip=1.0,
    ),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_entry_builds_an_optimizer_that_trains(name, recipe):
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    x = jax.random.normal(jax.random.key(0), (16, 4))
    y = x @ jnp.arange(12.0).reshape(4, 3) / 10

    def losses(p):
        return jnp.mean(jnp.square(x @ p["w"] + p["b"] - y), axis=-1)

    tx = build(name, RECIPES[recipe], hyper=1.0)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: losses(p).mean())(params)
        value = losses(params) if contender(name).per_example else loss
        updates, state = tx.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state, loss

    first = None
    for _ in range(30):
        params, state, loss = step(params, state)
        first = loss if first is None else first
    assert np.isfinite(loss) and loss < first, (name, first, loss)


def test_the_recipe_is_optax_adamw_after_the_clip_bitwise():
    base = RECIPES["standard"]
    ours = build("base", base)
    theirs = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            base.learning_rate,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p),
        ),
    )
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda p: 0.3 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), params)
    s1, s2 = ours.init(params), theirs.init(params)
    for _ in range(3):
        u1, s1 = ours.update(grads, s1, params, value=1.0)
        u2, s2 = theirs.update(grads, s2, params)
        jax.tree.map(np.testing.assert_array_equal, u1, u2)


def test_log_dampen_in_front_of_adam_is_logadam_bitwise():
    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.linspace(-3.0, 3.0, 12).reshape(4, 3)}
    for name, alias in (
        ("log_dampen", old.logadam(1e-3)),
        ("log_dampen(auto)", old.logadam(1e-3, dampen_scale="auto")),
    ):
        ours, s2 = build(name, Base(1e-3)), alias.init(params)
        s1 = ours.init(params)
        for _ in range(3):
            u1, s1 = ours.update(grads, s1, params, value=1.0)
            u2, s2 = alias.update(grads, s2, params)
            jax.tree.map(np.testing.assert_array_equal, u1, u2)


def test_the_guard_on_the_update_sits_between_adams_scaling_and_the_rate():
    """``spike_guard (on the update)`` judges Adam's update direction: after the
    recipe's clip and Adam's scaling, before the weight decay and the rate."""
    base = RECIPES["standard"]
    ours = build("spike_guard (on the update)", base)
    theirs = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
        old.spike_guard(),
        optax.add_decayed_weights(0.1, lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)),
        optax.scale_by_learning_rate(base.learning_rate),
    )
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    s1, s2 = ours.init(params), theirs.init(params)
    # Adam's own spike: after 60 steps of tiny gradients its second moment has decayed,
    # and the next ordinary gradient makes an update far above the recent ones.
    scales = [1.0] * 30 + [1e-3] * 60 + [1.0]
    for step, scale in enumerate(scales):
        wave = lambda p, k=step, c=scale: c * jnp.cos(k + jnp.arange(p.size)).reshape(p.shape)  # noqa: E731
        grads = jax.tree.map(wave, params)
        u1, s1 = ours.update(grads, s1, params, value=1.0)
        u2, s2 = theirs.update(grads, s2, params)
        jax.tree.map(np.testing.assert_array_equal, u1, u2)
    assert old.diagnostics(s1)["grad_norm/num_clipped"] >= 1  # the guard acted on the update

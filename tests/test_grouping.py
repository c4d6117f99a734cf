"""Tests of the grouped kernel: small tensors of one kind share one ``lax.map``.

Grouping changes what XLA compiles, not the arithmetic: every transform that dampens
(numeric and automatic knees, ``logadam``) gives bitwise the updates of the
tensor-by-tensor path (grouping off); the automatic knee's running
statistics, whose sums of squares may add in another order, agree to float32 rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_logdamp._dampening as dampening
import optax_logdamp._grouping as grouping
from optax_logdamp import log_dampen, logadam


@pytest.fixture(autouse=True)
def grouping_on(monkeypatch):
    """Grouping as on one CPU device (the suite simulates eight, where it is off)."""
    monkeypatch.setattr(grouping, "enabled", lambda: True)


def make_tree(dtype=jnp.float32):
    """37 tensors of shape (8, 16) (groups of 12, 12, 13), 3 of shape (5,), a scalar,
    one large tensor (never grouped), one empty and one of another dtype."""
    tree = {f"w{i:02d}": jnp.zeros((8, 16), dtype) for i in range(37)}
    tree.update({f"b{i}": jnp.zeros((5,), dtype) for i in range(3)})
    tree["scalar"] = jnp.zeros((), dtype)
    tree["large"] = jnp.zeros((grouping.MAX_GROUPED_SIZE + 1,), dtype)
    tree["empty"] = jnp.zeros((0, 3), dtype)
    tree["other_dtype"] = jnp.zeros((8, 16), jnp.bfloat16)
    return tree


def grads_at(tree, step):
    """Heavy-tailed gradients that change scale per tensor and step, with outliers,
    an all-zero tensor (its knee is not folded) and, at step 2, non-finite elements."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(step)
    out = []
    for index, leaf in enumerate(leaves):
        g = rng.standard_t(3, size=leaf.shape) * 10.0 ** rng.uniform(-4, 2)
        if index == 3:
            g = np.zeros(leaf.shape)
        if step == 2 and index in (1, 20) and g.size:
            g.reshape(-1)[:3] = [np.inf, -np.inf, np.nan]
        out.append(jnp.asarray(g, leaf.dtype))
    return treedef.unflatten(out)


def run(tx, tree, num_steps=5):
    """Updates and state after ``num_steps`` jitted steps (the fresh trace is this path's)."""
    state = tx.init(tree)
    update = jax.jit(tx.update)
    outputs = []
    for step in range(num_steps):
        updates, state = update(grads_at(tree, step), state, tree)
        outputs.append(updates)
    return jax.device_get((outputs, state))


def assert_same_run(grouped, alone):
    """The updates bitwise; the automatic knee's statistics to float32 rounding."""
    (updates_a, state_a), (updates_b, state_b) = grouped, alone
    assert_bitwise(updates_a, updates_b)
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        if np.asarray(x).dtype == np.int32:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-6)


def assert_bitwise(a, b):
    """Equal bit for bit, NaN included, leaf by leaf."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


TRANSFORMS = {
    "log_dampen()": lambda: log_dampen(),
    "log_dampen(0.37)": lambda: log_dampen(0.37),
    "log_dampen(3e-3)": lambda: log_dampen(3e-3),
    'log_dampen("auto")': lambda: log_dampen("auto"),
    "logadam": lambda: logadam(1e-3),
    'logadam("auto")': lambda: logadam(1e-3, dampen_scale="auto"),
    "inject_hyperparams scale": lambda: optax.inject_hyperparams(log_dampen)(scale=0.37),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_grouped_is_bitwise_the_tensor_by_tensor_path(name, monkeypatch):
    tree = make_tree()
    grouped = run(TRANSFORMS[name](), tree)
    monkeypatch.setattr(grouping, "enabled", lambda: False)
    assert_same_run(grouped, run(TRANSFORMS[name](), tree))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.complex64], ids=str)
@pytest.mark.parametrize("scale", [1.0, "auto"])
def test_grouped_is_bitwise_for_other_dtypes(dtype, scale, monkeypatch):
    tree = make_tree(dtype)
    grouped = run(log_dampen(scale), tree, num_steps=3)
    monkeypatch.setattr(grouping, "enabled", lambda: False)
    assert_same_run(grouped, run(log_dampen(scale), tree, num_steps=3))


def test_grouped_is_bitwise_for_float64():
    with jax.enable_x64(True):
        tree = make_tree(jnp.float64)
        grouped = run(log_dampen("auto"), tree, num_steps=3)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(grouping, "enabled", lambda: False)
            assert_same_run(grouped, run(log_dampen("auto"), tree, num_steps=3))


def test_groups_partition_the_leaves_by_kind_and_size():
    leaves = jax.tree.leaves(make_tree())
    groups = grouping.groups_of(leaves)
    assert sorted(i for group in groups for i in group) == list(range(len(leaves)))
    sizes = sorted(len(group) for group in groups)
    # (8, 16): 37 in 3 even groups; (5,): 3, too few to group; scalar, large, empty,
    # bfloat16: alone.
    assert sizes == [1, 1, 1, 1, 1, 1, 1, 12, 12, 13]
    for group in groups:
        kinds = {(leaves[i].shape, leaves[i].dtype) for i in group}
        assert len(kinds) == 1
        assert len(group) == 1 or 0 < leaves[group[0]].size <= grouping.MAX_GROUPED_SIZE


def count_loops(tx, tree, grads=None):
    """``lax.map`` loops (scan equations) in the jaxpr of one update."""
    state = tx.init(tree)
    grads = grads_at(tree, 0) if grads is None else grads
    jaxpr = jax.make_jaxpr(tx.update)(grads, state, tree)
    return sum(eqn.primitive.name == "scan" for eqn in jaxpr.jaxpr.eqns)


def test_the_kernel_is_traced_once_per_group(monkeypatch):
    tree = make_tree()
    assert count_loops(log_dampen(), tree) == 3  # (8, 16) x 3 groups
    assert count_loops(log_dampen("auto"), tree) == 3
    monkeypatch.setattr(grouping, "enabled", lambda: False)
    assert count_loops(log_dampen("auto"), tree) == 0


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per tensor"])
def test_each_kind_of_tensor_is_traced_once(grouped, monkeypatch):
    monkeypatch.setattr(grouping, "enabled", lambda: grouped)
    traced = []

    def double(g):
        traced.append(g.shape)
        return 2 * g

    tensors = [jnp.ones(3)] * 13 + [jnp.ones((2, 2))] * 2  # 13: a group of its own
    jitted = jax.jit(double)
    out = jax.jit(lambda ts: grouping.map_leaves(jitted, ts))(tensors)
    assert sorted(traced) == [(2, 2), (3,)]  # one trace per shape, not per tensor
    for g, doubled in zip(tensors, out, strict=True):
        np.testing.assert_array_equal(doubled, 2 * g)
    grouping.map_leaves(jitted, tensors)  # outside jit: the compiled kernels are reused
    assert len(traced) == 2


def test_the_dampening_kernels_are_traced_once_across_steps(monkeypatch):
    """Outside ``jit`` too: a step does not trace (and compile) its kernels again."""
    traced = []
    original = dampening.dampen_above_knee
    monkeypatch.setattr(
        dampening, "dampen_above_knee", lambda g, k: traced.append(g.shape) or original(g, k)
    )
    tx = log_dampen("auto")
    shape = (3, 17)  # a shape no other test gives the module's jitted kernel
    params = {"w": jnp.ones(shape), "v": jnp.ones(shape)}
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(params, state)
    assert traced == [shape]


def test_grouping_is_on_for_one_cpu_device_only(monkeypatch):
    monkeypatch.undo()  # the platform's own decision, not the fixture's
    assert jax.device_count() == 8  # this suite's simulated devices
    assert not grouping.enabled()
    assert count_loops(log_dampen(), make_tree()) == 0
    monkeypatch.setattr(jax, "device_count", lambda *args: 1)
    assert grouping.enabled() == (jax.default_backend() == "cpu")


def test_a_tree_of_distinct_shapes_is_not_grouped():
    tree = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((4, 3)), "c": jnp.zeros(7)}
    assert count_loops(log_dampen("auto"), tree) == 0


needs_eight_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 (simulated) devices"
)


@needs_eight_devices
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_grouping_is_exact_on_sharded_tensors(axis_type, monkeypatch):
    """Same-shape tensors sharded three ways, grouping forced on: the sharded step equals
    the unsharded, ungrouped one. Under explicit sharding a stack never mixes two
    layouts, so every update keeps its tensor's sharding."""
    group = grouping.MIN_GROUP_SIZE
    specs = {f"r{i}": P("x", None) for i in range(group)}
    specs.update({f"c{i}": P(None, "x") for i in range(group)})
    specs.update({f"p{i}": P() for i in range(group)})
    tree = {key: jnp.zeros((16, 8)) for key in specs}
    mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
    shardings = {key: NamedSharding(mesh, spec) for key, spec in specs.items()}
    tx = log_dampen("auto")
    with jax.set_mesh(mesh):
        params = jax.device_put(tree, shardings)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for step in range(3):
            grads = jax.device_put(grads_at(tree, step), shardings)
            updates, state = update(grads, state, params)
        if axis_type == AxisType.Explicit:
            assert count_loops(tx, params, grads) == 3  # one group per layout
            for key, leaf in updates.items():
                assert leaf.sharding.is_equivalent_to(shardings[key], leaf.ndim), key
        sharded = jax.device_get((updates, state))
    monkeypatch.setattr(grouping, "enabled", lambda: False)
    state = tx.init(tree)
    update = jax.jit(tx.update)
    for step in range(3):
        updates, state = update(grads_at(tree, step), state, tree)
    reference = jax.device_get((updates, state))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), sharded, reference)


def test_grouping_works_under_vmap():
    """The loop composes with vmap (an ensemble of optimizers): each member as alone."""
    tree = {f"w{i}": jnp.zeros((4, 4)) for i in range(grouping.MIN_GROUP_SIZE)}
    tx = log_dampen("auto")
    assert count_loops(tx, tree) == 1
    grads = jax.tree.map(lambda g: jnp.stack([g, 2 * g]), grads_at(tree, 1))
    state = jax.vmap(tx.init)(jax.tree.map(lambda g: jnp.stack([g, g]), tree))
    for _ in range(2):
        updates, state = jax.vmap(tx.update)(grads, state)
    for k in range(2):
        member = jax.tree.map(lambda g, k=k: g[k], grads)
        single_state = tx.init(tree)
        for _ in range(2):
            single, single_state = tx.update(member, single_state)
        assert_bitwise(jax.tree.map(lambda u, k=k: u[k], updates), single)


def test_the_global_norm_of_small_tensors_is_one_reduction():
    """Grouped, the gradient norm of many small tensors is one reduction (and one for the
    large tensor), and equals the float64 norm to float32 rounding."""
    from optax_logdamp._numerics import global_norm

    tree = make_tree()
    grads = grads_at(tree, 1)
    grads = {k: v for k, v in grads.items() if jnp.all(jnp.isfinite(v))}
    assert len(grads) >= 40
    hlo = jax.jit(global_norm).lower(grads).as_text()
    assert hlo.count("stablehlo.reduce") == 2
    exact = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
    np.testing.assert_allclose(global_norm(grads), exact, rtol=1e-6)

"""One check that a new optimizer trains alike on 8 devices and on one (issue 19's tests).

It reuses the model, batches (one spike) and runners of ``tests/test_multidevice.py``:
pmap and shard_map with ``axis_name``, and sharded ``jit`` over a ``Mesh`` (FSDP specs).
"""

import functools

import chex
import jax
import test_multidevice as md
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

needs_eight_devices = md.pytestmark
Case = md.Case


def single_device(case: md.Case):
    """Params and optimizer state after a single-device run on the full batches."""
    tx = case.make_tx(None)
    step = jax.jit(functools.partial(md._train_step, tx=tx, per_example=case.per_example))
    params = jax.device_put(md._init_params(), jax.devices()[0])
    opt_state = tx.init(params)
    for x, y in zip(*md._batches(), strict=True):
        params, opt_state = step(params, opt_state, x, y)
    return jax.device_get((params, opt_state))


def assert_agrees_on_every_layout(case: md.Case, reference=None) -> None:
    """pmap, shard_map and sharded jit each end where the single-device run does."""
    ref = single_device(case) if reference is None else reference

    def check(params, opt_state):
        got = jax.device_get((params, opt_state))
        chex.assert_trees_all_close(got, ref, rtol=md.RTOL, atol=md.ATOL)

    params, opt_state = md._run_pmap(case, md.AXIS)
    md._assert_replicas_identical((params, opt_state))
    check(*jax.tree.map(lambda a: a[0], (params, opt_state)))
    params, opt_state = md._run_shard_map(case)
    md._assert_shards_identical((params, opt_state))
    check(params, opt_state)
    tx = case.make_tx(None)
    mesh = jax.make_mesh((md.NUM_DEVICES,), (md.AXIS,), axis_types=(AxisType.Auto,))
    shardings = {key: NamedSharding(mesh, spec) for key, spec in md.FSDP_SPECS.items()}
    with jax.set_mesh(mesh):
        params = jax.device_put(md._init_params(), shardings)
        opt_state = tx.init(params)
        step = jax.jit(
            functools.partial(md._train_step, tx=tx, per_example=case.per_example, gather=True)
        )
        for x, y in zip(*md._batches(), strict=True):
            x, y = jax.device_put((x, y), NamedSharding(mesh, P(md.AXIS)))
            params, opt_state = step(params, opt_state, x, y)
    check(params, opt_state)

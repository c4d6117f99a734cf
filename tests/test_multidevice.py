"""Data-parallel training on 8 simulated CPU devices: pmap, shard_map and sharded jit.

Every run trains the same tiny linear model for ``NUM_STEPS`` steps on the same global
batches, one of which holds a loss spike on a single replica's shard. Each
multi-device run must end with params and optimizer state identical on all replicas
and equal, to float32 rounding, to a single-device run on the full batch.
``tests/conftest.py`` gives this process 8 CPU devices.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from optax_logdamp import alrc, alrc_per_example, cap_losses, log_dampen, logadam, spike_guard
from optax_logdamp._statistics import find_alrc_states

NUM_DEVICES = 8
pytestmark = pytest.mark.skipif(
    jax.device_count() != NUM_DEVICES,
    reason=(
        f"needs {NUM_DEVICES} devices, found {jax.device_count()}: run through pytest so that "
        "tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8 "
        "before jax is imported"
    ),
)

NUM_STEPS = 6
PER_DEVICE = 4  # examples per replica; the global batch is 32
FEATURES = 16  # divisible by NUM_DEVICES: the weight's first dim is sharded FSDP-style
OUTPUTS = 8
SPIKE_STEP = 3  # at this step ...
SPIKE_DEVICE = 5  # ... this replica's examples have their targets multiplied by 1000
AXIS = "data"
RTOL, ATOL = 1e-5, 1e-6  # float32 rounding: all-reduce and full-batch sums differ in order

Params = dict[str, jax.Array]


class Case(NamedTuple):
    """An optimizer to test: its factory (given the ALRC axis name) and its loss form."""

    make_tx: Callable[[str | None], optax.GradientTransformationExtraArgs]
    per_example: bool  # True: cap_losses in the loss, per-example losses as `value`


CASES = {
    "log_dampen": Case(lambda axis: optax.chain(log_dampen(), optax.sgd(0.01)), False),
    "alrc": Case(lambda axis: optax.chain(alrc(axis_name=axis), optax.sgd(0.01)), False),
    "alrc_per_example": Case(
        lambda axis: optax.chain(alrc_per_example(axis_name=axis), optax.sgd(0.01)), True
    ),
    "logadam": Case(lambda axis: logadam(0.05), False),
    "alrc+logadam": Case(lambda axis: optax.chain(alrc(axis_name=axis), logadam(0.05)), False),
    "alrc_grad_norm": Case(
        lambda axis: optax.chain(alrc(signal="grad_norm", axis_name=axis), optax.sgd(0.01)), False
    ),
    "alrc_both+logadam_auto": Case(
        lambda axis: optax.chain(
            alrc(signal="both", axis_name=axis), logadam(0.05, dampen_scale="auto")
        ),
        False,
    ),
    "spike_guard+adam": Case(
        lambda axis: optax.chain(spike_guard(axis_name=axis), optax.adam(0.05)), False
    ),
    "spike_guard_both+sgd": Case(
        lambda axis: optax.chain(spike_guard(signal="both", axis_name=axis), optax.sgd(0.01)),
        False,
    ),
}
ALRC_CASES = [
    "alrc",
    "alrc_per_example",
    "alrc+logadam",
    "alrc_grad_norm",
    "alrc_both+logadam_auto",
    "spike_guard+adam",
    "spike_guard_both+sgd",
]
FSDP_SPECS = {"w": P(AXIS, None), "b": P(AXIS)}  # params sharded over the data axis too


# --------------------------------------------------------------------------- data, model


def _batches() -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of shape ``(NUM_STEPS, global batch, ...)``, with one spike."""
    rng = np.random.default_rng(0)
    global_batch = NUM_DEVICES * PER_DEVICE
    x = rng.normal(size=(NUM_STEPS, global_batch, FEATURES)).astype(np.float32)
    w_true = rng.normal(size=(FEATURES, OUTPUTS))
    y = x @ w_true + 0.1 * rng.normal(size=(NUM_STEPS, global_batch, OUTPUTS))
    spike_rows = slice(SPIKE_DEVICE * PER_DEVICE, (SPIKE_DEVICE + 1) * PER_DEVICE)
    y[SPIKE_STEP, spike_rows] *= 1000.0
    return x, y.astype(np.float32)


def _init_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "w": (0.1 * rng.normal(size=(FEATURES, OUTPUTS))).astype(np.float32),
        "b": np.zeros(OUTPUTS, np.float32),
    }


def _loss(params: Params, opt_state: Any, x, y, per_example: bool, gather: bool):
    """Mean squared error of the batch (per-example capped if asked), and each loss."""
    if gather:  # FSDP: all-gather the sharded params before use
        params = jax.sharding.reshard(params, P())
    losses = jnp.mean(jnp.square(x @ params["w"] + params["b"] - y), axis=-1)
    if per_example:
        return jnp.mean(cap_losses(losses, opt_state)), losses
    return jnp.mean(losses), losses


def _train_step(params, opt_state, x, y, *, tx, per_example, reduce_grads=None, gather=False):
    """One training step on the batch this device (or the jitted program) sees."""
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    (loss, losses), grads = grad_fn(params, opt_state, x, y, per_example, gather)
    if reduce_grads is not None:
        grads = reduce_grads(grads)
    updates, opt_state = tx.update(grads, opt_state, params, value=losses if per_example else loss)
    return optax.apply_updates(params, updates), opt_state


def _pmean_grads(grads: Params) -> Params:
    """pmap: each replica holds the gradient of its own shard; average them."""
    return jax.lax.pmean(grads, AXIS)


def _mean_of_summed_grads(grads: Params) -> Params:
    """shard_map: the gradient w.r.t. replicated params comes out psum'd; average it."""
    return jax.tree.map(lambda g: g / jax.lax.axis_size(AXIS), grads)


# --------------------------------------------------------------------------- runners


@functools.cache
def _reference(name: str) -> tuple[Any, Any]:
    """Params and optimizer state after a single-device run on the full batches."""
    case = CASES[name]
    tx = case.make_tx(None)
    step = jax.jit(functools.partial(_train_step, tx=tx, per_example=case.per_example))
    params = jax.device_put(_init_params(), jax.devices()[0])
    opt_state = tx.init(params)
    for x, y in zip(*_batches(), strict=True):
        params, opt_state = step(params, opt_state, x, y)
    return jax.device_get((params, opt_state))


def _run_pmap(case: Case, alrc_axis: str | None) -> tuple[Any, Any]:
    """Trains under pmap; returns params and state with a leading replica axis."""
    tx = case.make_tx(alrc_axis)
    step = jax.pmap(
        functools.partial(
            _train_step, tx=tx, per_example=case.per_example, reduce_grads=_pmean_grads
        ),
        axis_name=AXIS,
    )
    params = jax.tree.map(lambda a: np.broadcast_to(a, (NUM_DEVICES, *a.shape)), _init_params())
    opt_state = jax.pmap(tx.init)(params)
    for x, y in zip(*_batches(), strict=True):
        split = lambda a: a.reshape(NUM_DEVICES, PER_DEVICE, *a.shape[1:])  # noqa: E731
        params, opt_state = step(params, opt_state, split(x), split(y))
    return jax.device_get((params, opt_state))


def _auto_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(AxisType.Auto,))


def _shard_map_step(case: Case, alrc_axis: str | None, mesh: jax.sharding.Mesh):
    """The training step under shard_map: params and state replicated, batch split."""
    tx = case.make_tx(alrc_axis)
    body = functools.partial(
        _train_step, tx=tx, per_example=case.per_example, reduce_grads=_mean_of_summed_grads
    )
    step = jax.shard_map(
        body, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=(P(), P())
    )
    return tx, jax.jit(step)


def _run_shard_map(case: Case) -> tuple[Any, Any]:
    mesh = _auto_mesh()
    tx, step = _shard_map_step(case, AXIS, mesh)
    params = jax.device_put(_init_params(), NamedSharding(mesh, P()))
    opt_state = tx.init(params)
    for x, y in zip(*_batches(), strict=True):
        params, opt_state = step(params, opt_state, x, y)
    return params, opt_state


# --------------------------------------------------------------------------- checks


def _assert_replicas_identical(stacked: Any) -> None:
    """Every leaf (leading replica axis) holds the same value on every replica."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(stacked):
        for replica in range(1, NUM_DEVICES):
            np.testing.assert_array_equal(
                leaf[replica], leaf[0], err_msg=f"{jax.tree_util.keystr(path)}, replica {replica}"
            )


def _assert_shards_identical(tree: Any) -> None:
    """Every replicated global array holds the same value on every device."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        assert leaf.is_fully_replicated, jax.tree_util.keystr(path)
        first = np.asarray(leaf.addressable_shards[0].data)
        for shard in leaf.addressable_shards[1:]:
            np.testing.assert_array_equal(np.asarray(shard.data), first)


def _assert_matches_reference(name: str, params: Any, opt_state: Any) -> None:
    ref_params, ref_state = _reference(name)
    chex.assert_trees_all_close(jax.device_get(params), ref_params, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(jax.device_get(opt_state), ref_state, rtol=RTOL, atol=ATOL)


def _diverges(stacked: Any) -> bool:
    """Whether some leaf (leading replica axis) differs between replicas."""
    return any(not np.all(leaf == leaf[:1]) for leaf in jax.tree.leaves(stacked))


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ALRC_CASES)
def test_reference_run_clips_the_spike(name):
    """The spike really is clipped, so the equality tests below cover a clipped step."""
    _, ref_state = _reference(name)
    found = find_alrc_states(ref_state)  # one per signal
    assert len(found) == (2 if "both" in name else 1)
    for _, stats in found:
        assert stats.num_clipped > 0
        assert stats.num_steps == NUM_STEPS


@pytest.mark.parametrize("name", list(CASES))
def test_pmap_with_axis_name_matches_single_device(name):
    params, opt_state = _run_pmap(CASES[name], AXIS)
    _assert_replicas_identical((params, opt_state))
    first = jax.tree.map(lambda a: a[0], (params, opt_state))
    _assert_matches_reference(name, *first)


def test_pmap_without_axis_name_replicas_diverge():
    """The danger ``axis_name`` prevents: each replica clips by its own loss."""
    params, opt_state = _run_pmap(CASES["alrc"], None)
    assert _diverges(optax.tree.get(opt_state, "threshold"))
    assert _diverges(params)  # even though the gradients were averaged


def test_pmap_per_example_without_axis_name_caps_by_local_statistics():
    """Per-example ALRC without ``axis_name``: thresholds drift apart per replica.

    The params stay equal across replicas (only the gradients are all-reduced), but
    each replica capped its examples by its own threshold: not the full-batch run.
    """
    params, opt_state = _run_pmap(CASES["alrc_per_example"], None)
    assert _diverges(optax.tree.get(opt_state, "threshold"))
    ref_params, _ = _reference("alrc_per_example")
    assert not np.allclose(params["w"][0], ref_params["w"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", list(CASES))
def test_shard_map_with_axis_name_matches_single_device(name):
    params, opt_state = _run_shard_map(CASES[name])
    _assert_shards_identical((params, opt_state))
    _assert_matches_reference(name, params, opt_state)


@pytest.mark.parametrize("name", ["alrc", "alrc_per_example"])
def test_shard_map_without_axis_name_is_rejected(name):
    """shard_map's replication check catches a state that varies across the axis."""
    mesh = _auto_mesh()
    tx, step = _shard_map_step(CASES[name], None, mesh)
    params = jax.device_put(_init_params(), NamedSharding(mesh, P()))
    x, y = (a[0] for a in _batches())
    with pytest.raises(ValueError, match="out_specs"):
        step(params, tx.init(params), x, y)


def _assert_same_shardings(actual: Any, expected: Any) -> None:
    """Leaf by leaf, ``actual`` is laid out over the devices as ``expected`` is."""
    expected_leaves = jax.tree.leaves(expected)
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(actual), expected_leaves, strict=True
    ):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (
            f"{jax.tree_util.keystr(path)}: {got.sharding} != {want.sharding}"
        )


def _assert_state_sharded_like_params(opt_state: Any, params: Params) -> None:
    """Scalars (ALRC statistics, counters) replicated; moments sharded like their param."""
    by_shape = {leaf.shape: leaf.sharding for leaf in params.values()}
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        where = jax.tree_util.keystr(path)
        if leaf.ndim == 0:
            assert leaf.sharding.is_fully_replicated, where
        else:
            assert leaf.sharding.is_equivalent_to(by_shape[leaf.shape], leaf.ndim), where


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_jit_matches_single_device_and_keeps_shardings(name, axis_type):
    """jit over a mesh: the loss is a global mean, no axis_name; FSDP params stay sharded."""
    case = CASES[name]
    tx = case.make_tx(None)
    mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(axis_type,))
    param_shardings = {key: NamedSharding(mesh, spec) for key, spec in FSDP_SPECS.items()}
    with jax.set_mesh(mesh):
        params = jax.device_put(_init_params(), param_shardings)
        initial_params = params
        opt_state = initial_state = tx.init(params)
        _assert_state_sharded_like_params(initial_state, params)
        if axis_type == AxisType.Explicit:  # shardings are part of the types: jit agrees
            _assert_same_shardings(jax.jit(tx.init)(params), initial_state)
        step = jax.jit(
            functools.partial(_train_step, tx=tx, per_example=case.per_example, gather=True)
        )
        for x, y in zip(*_batches(), strict=True):
            x, y = jax.device_put((x, y), NamedSharding(mesh, P(AXIS)))
            params, opt_state = step(params, opt_state, x, y)
            _assert_same_shardings(opt_state, initial_state)
            _assert_same_shardings(params, initial_params)
    _assert_matches_reference(name, params, opt_state)


# --------------------------------------------------------------------------- the example

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide" / "data_parallel.md"  # the commands a user is told to run
EXAMPLE = "examples/data_parallel.py"
TIMEOUT_S = 300  # the three processes together take ~30 s on 2 CPU cores


def _guide_commands(marker: str) -> list[list[str]]:
    """The commands of the guide's bash block that runs the example with ``marker``.

    Continuation lines are joined and a trailing ``&`` (run in the background) dropped:
    the test starts every command itself, concurrently.
    """
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    block = next(b for b in blocks if EXAMPLE in b and marker in b)
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines()]
    commands = [[token for token in c if token != "&"] for c in commands if c]
    assert all(c[:2] == ["python", EXAMPLE] for c in commands), block
    return commands


def _start(command: list[str], port: int) -> subprocess.Popen:
    """Starts one of the guide's commands in its own process group, with the devices of its flags.

    Only the coordinator's port changes (to a free one), so that a busy port 12345
    cannot fail the test; every other flag is the guide's, defaults included.
    """
    command = [re.sub(r"^localhost:\d+$", f"localhost:{port}", token) for token in command]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen(
        [sys.executable, *command[1:]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group: killed as a whole on a hang
    )


def _finish_all(processes: list[subprocess.Popen], timeout: float) -> list[str]:
    """The outputs of ``processes``; on a hang, SIGKILL every group and fail.

    A hung multi-host JAX process ignores SIGTERM (``jax.distributed`` takes it as a
    preemption notice), so only SIGKILL stops it.
    """
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            outputs.append(output)
    except subprocess.TimeoutExpired:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        partial = [process.communicate()[0] for process in processes]
        pytest.fail(
            f"the guide's commands hung for {timeout} s; output so far:\n" + "\n---\n".join(partial)
        )
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
    return outputs


def _step_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("step ")]


def _numbers(line: str) -> list[float]:
    return [float(token) for token in re.findall(r"-?\d+\.?\d*", line)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


_EXAMPLE_RUN: list[tuple[str, list[str]] | str] = []  # the one run's outputs, or its failure


def _example_outputs() -> tuple[str, list[str]]:
    """Outputs of the guide's single-host command and of its two-process job.

    The commands are the guide's own, with their default flags (300 steps): with these
    the two-process job once hung, which shorter test-only flags did not show. The
    three processes start together: they overlap their start-up and compilation. They
    run once for both tests; a failure (a hang included) fails both without a rerun.
    """
    if not _EXAMPLE_RUN:
        (single_host,) = _guide_commands("--simulate-devices 8")
        multihost = _guide_commands("--num-processes 2")
        assert len(multihost) == 2
        port = _free_port()
        processes = [_start(command, port) for command in [single_host, *multihost]]
        try:
            single_host_output, *multihost_outputs = _finish_all(processes, TIMEOUT_S)
            _EXAMPLE_RUN.append((single_host_output, multihost_outputs))
        except BaseException as error:  # pytest.fail raises an outcome, not an Exception
            _EXAMPLE_RUN.append(str(error))
            raise
    if isinstance(_EXAMPLE_RUN[0], str):
        pytest.fail(_EXAMPLE_RUN[0])
    return _EXAMPLE_RUN[0]


def test_example_runs_on_eight_simulated_devices():
    output, _ = _example_outputs()
    assert "1 process(es), 8 devices (cpu)" in output
    lines = _step_lines(output)
    assert [int(line.split()[1]) for line in lines] == [*range(0, 300, 30), 299]
    assert "scale 1.000" in lines[1] and "num_clipped 0" in lines[1]
    assert "num_clipped 1" in lines[2] and "scale 1.000" not in lines[2]  # step 60, clipped
    assert "num_clipped 4" in lines[-1]  # the spikes at steps 60, 120, 180 and 240
    assert "done: 300 steps" in output


def test_example_multihost_matches_single_host():
    """Two processes x 4 CPU devices joined by jax.distributed: the same training run."""
    single_host, (process_0, process_1) = _example_outputs()
    assert "2 process(es), 8 devices (cpu)" in process_0
    assert "done: 300 steps" in process_0
    assert _step_lines(process_1) == []  # only process 0 prints
    multihost_numbers = [_numbers(line) for line in _step_lines(process_0)]
    single_host_numbers = [_numbers(line) for line in _step_lines(single_host)]
    np.testing.assert_allclose(multihost_numbers, single_host_numbers, rtol=1e-3)

"""Data-parallel training with ALRC + LogAdam, written the way a TPU-pod script is.

The same program runs on every host (process) of the job. Each process:

1. joins the job with ``jax.distributed.initialize()`` (multi-host runs only);
2. builds one mesh over all devices of all processes (``jax.devices()``);
3. loads only its own slice of each global batch and assembles the global batch,
   sharded over the mesh, with ``jax.make_array_from_process_local_data``;
4. runs one ``jit``-compiled step over the mesh. The loss is the mean over the
   global batch, so every device sees the same loss: ``alrc()`` needs no
   ``axis_name`` here (that is only for per-replica losses under ``pmap`` or
   ``shard_map``), and the ALRC statistics are replicated on every device;
5. waits for the results of its steps at the same points as every other process:
   it never runs more than ``MAX_STEPS_IN_FLIGHT`` steps ahead of its devices, and
   every process reads the diagnostics at the logging steps (process 0 prints them).

Why step 5 matters: multi-host JAX needs every process to run the same computations
and host transfers in the same order. A process that never waits for a result (as
process 1 did when only process 0 read the logged values) queues steps without
bound; on CPU, XLA admits 32 queued computations per device, and past that the
cross-process all-reduce deadlocks: the job hangs with no CPU use (seen with jax
0.10.2 and two processes). A short bounded queue costs nothing: the host still
prepares the next batch while the devices compute.

Every ``--spike-every`` steps one device's shard of the batch is corrupted (wrong
labels, inputs multiplied by 10): a loss spike, which ALRC clips. With the default
flags the spike steps are logged, so ``scale < 1`` and ``num_clipped`` show each clip.

Run it here, on 8 simulated CPU devices::

    python examples/data_parallel.py --simulate-devices 8

On a multi-host TPU pod (every worker runs the same command)::

    gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all \\
        --command="python examples/data_parallel.py --multihost"

On a GPU cluster, one process per host (under SLURM ``--multihost`` is enough)::

    python examples/data_parallel.py --coordinator-address=HOST0:1234 \\
        --num-processes=4 --process-id=$RANK
"""

from __future__ import annotations

import argparse
import collections
import itertools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from optax_logdamp import alrc, logadam

Params = dict[str, jax.Array]
DATA_AXIS = "data"
SPIKE_FACTOR = 10.0
MAX_STEPS_IN_FLIGHT = 2  # steps dispatched ahead of the devices, on every process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--simulate-devices",
        type=int,
        default=0,
        help="simulate this many CPU devices (per process), to try the script without accelerators",
    )
    parser.add_argument(
        "--multihost",
        action="store_true",
        help="call jax.distributed.initialize() (auto-detects TPU pods, SLURM, Open MPI)",
    )
    parser.add_argument("--coordinator-address", help="HOST:PORT of process 0 (implies multi-host)")
    parser.add_argument("--num-processes", type=int, help="processes in the job")
    parser.add_argument("--process-id", type=int, help="this process's index")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--global-batch", type=int, default=256, help="examples per step, all hosts"
    )
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=30)
    parser.add_argument("--spike-every", type=int, default=60, help="0: no corrupted batches")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def setup_devices(args: argparse.Namespace) -> None:
    """Joins the multi-host job and/or simulates CPU devices.

    Must run before any JAX computation: both settings are read when the backend starts.

    Args:
      args: the parsed command line.
    """
    multihost = args.multihost or args.coordinator_address is not None
    if args.simulate_devices:  # N CPU devices in this process (per process if multi-host)
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.simulate_devices)
    if multihost:
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )


def load_digits(seed: int) -> tuple[np.ndarray, ...]:
    """scikit-learn's 8x8 digits, scaled to [0, 1]; the same split on every process.

    Args:
      seed: seed of the shuffle before the split.

    Returns:
      ``(train_images, train_labels, test_images, test_labels)``, a fifth for testing.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    images, labels = sklearn_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(labels))
    images = (images[order] / 16.0).astype(np.float32)
    labels = labels[order].astype(np.int32)
    num_test = len(labels) // 5
    return images[num_test:], labels[num_test:], images[:num_test], labels[:num_test]


def init_params(seed: int, sizes: tuple[int, ...]) -> Params:
    """An MLP with layer sizes ``sizes``, He-initialised (the same on every process)."""
    key = jax.random.key(seed)
    params = {}
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        key, subkey = jax.random.split(key)
        std = jnp.sqrt(2.0 / fan_in)
        params[f"w{layer}"] = std * jax.random.normal(subkey, (fan_in, fan_out), jnp.float32)
        params[f"b{layer}"] = jnp.zeros(fan_out, jnp.float32)
    return params


def predict(params: Params, images: jax.Array) -> jax.Array:
    """Logits of the MLP."""
    num_layers = len(params) // 2
    hidden = images
    for layer in range(num_layers):
        hidden = hidden @ params[f"w{layer}"] + params[f"b{layer}"]
        if layer < num_layers - 1:
            hidden = jax.nn.relu(hidden)
    return hidden


def loss_fn(params: Params, images: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy over the GLOBAL batch: the same value on every device."""
    logits = predict(params, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(tx: optax.GradientTransformationExtraArgs) -> Callable[..., Any]:
    """The jitted training step over the mesh.

    Args:
      tx: the optimizer; it receives the global loss as ``value``.

    Returns:
      ``train_step(params, opt_state, images, labels) -> (params, opt_state, loss)``,
      with params and optimizer state donated (updated in place).
    """

    def train_step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(train_step, donate_argnums=(0, 1))


@jax.jit
def accuracy(params: Params, images: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of ``images`` classified as ``labels``."""
    return jnp.mean(jnp.argmax(predict(params, images), axis=-1) == labels)


def local_batch(
    images: np.ndarray,
    labels: np.ndarray,
    step: int,
    args: argparse.Namespace,
    num_local_devices: int,
) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of the global batch of ``step``.

    Every process draws the same global batch (same seed) and keeps its own block of
    rows, so no process ever holds the whole batch.

    Args:
      images: training images.
      labels: training labels.
      step: the training step (with ``args.seed``, the seed of the draw).
      args: the parsed command line (``global_batch``, ``spike_every``, ``seed``).
      num_local_devices: devices of this process (a spike corrupts one device's rows).

    Returns:
      The process-local images and labels.
    """
    local_size = args.global_batch // jax.process_count()
    rows = np.random.default_rng([args.seed, step]).choice(len(labels), args.global_batch)
    rows = rows[jax.process_index() * local_size : (jax.process_index() + 1) * local_size]
    batch_images, batch_labels = images[rows], labels[rows]
    if args.spike_every and step > 0 and step % args.spike_every == 0 and jax.process_index() == 0:
        per_device = local_size // num_local_devices
        batch_images, batch_labels = batch_images.copy(), batch_labels.copy()
        batch_images[:per_device] *= SPIKE_FACTOR  # a corrupted shard: a loss spike
        batch_labels[:per_device] = (batch_labels[:per_device] + 1) % 10
    return batch_images, batch_labels


def global_array(local_data: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global array whose process-local part is ``local_data``."""
    return jax.make_array_from_process_local_data(sharding, local_data)


def read(value: jax.Array) -> float:
    """A replicated scalar as a Python number (its copy on a local device)."""
    return float(np.asarray(value.addressable_data(0)))


def log_diagnostics(step: int, loss: jax.Array, opt_state: Any) -> None:
    """ALRC's diagnostics: read on every process (the same host transfers everywhere),
    printed by process 0."""
    diag = {name: read(optax.tree.get(opt_state, name)) for name in ("threshold", "scale", "mean")}
    num_clipped = int(read(optax.tree.get(opt_state, "num_clipped")))
    loss_value = read(loss)
    if jax.process_index() != 0:
        return
    print(
        f"step {step:4d}  loss {loss_value:9.4f}  alrc: mean {diag['mean']:.4f}  "
        f"threshold {diag['threshold']:.4f}  scale {diag['scale']:.3f}  "
        f"num_clipped {num_clipped}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Trains the MLP data-parallel over all devices of all processes."""
    args = parse_args(argv)
    setup_devices(args)
    devices = jax.devices()
    if args.global_batch % len(devices):
        raise SystemExit(f"--global-batch must be a multiple of {len(devices)} devices.")
    mesh = jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )
    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))  # examples split over all devices
    replicated = NamedSharding(mesh, P())
    if jax.process_index() == 0:
        print(
            f"{jax.process_count()} process(es), {len(devices)} devices "
            f"({devices[0].platform}), global batch {args.global_batch}",
            flush=True,
        )

    train_x, train_y, test_x, test_y = load_digits(args.seed)
    sizes = (train_x.shape[1], 128, 10)
    init = jax.jit(init_params, static_argnums=(0, 1), out_shardings=replicated)
    params = init(args.seed, sizes)  # created on the devices, replicated
    tx = optax.chain(alrc(), logadam(args.learning_rate))
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    train_step = make_train_step(tx)

    num_local_devices = len(jax.local_devices())
    start = time.perf_counter()
    in_flight: collections.deque[jax.Array] = collections.deque()
    for step in range(args.steps):
        images, labels = local_batch(train_x, train_y, step, args, num_local_devices)
        images = global_array(images, batch_sharding)
        labels = global_array(labels, batch_sharding)
        params, opt_state, loss = train_step(params, opt_state, images, labels)
        in_flight.append(loss)
        if len(in_flight) > MAX_STEPS_IN_FLIGHT:  # every process waits at the same step
            in_flight.popleft().block_until_ready()
        if step % args.log_every == 0 or step == args.steps - 1:
            log_diagnostics(step, loss, opt_state)

    test_accuracy = accuracy(
        params, global_array(test_x, replicated), global_array(test_y, replicated)
    )
    test_accuracy, num_clipped = read(test_accuracy), read(optax.tree.get(opt_state, "num_clipped"))
    if jax.process_index() == 0:
        print(
            f"done: {args.steps} steps in {time.perf_counter() - start:.1f} s, "
            f"test accuracy {test_accuracy:.3f}, clipped steps {int(num_clipped)}",
            flush=True,
        )


if __name__ == "__main__":
    main()

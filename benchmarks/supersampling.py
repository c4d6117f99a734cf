"""ALRC's own experiment: 2x super-sampling of natural images with a residual conv net.

From the paper's code (github.com/Jeffrey-Ede/ALRC, ``quartic/training_quartic``): the
target is an image, the input is that image resized down 2x and back up (bilinear),
and the network is conv 5x5 (64), conv 3x3 (128), three residual blocks of two conv
3x3 (128), conv 3x3 (64), conv 5x5 (3, linear), all stride 1 with ReLU. Each image's
loss is ``25 * mean(error**4)`` (quartic runs) or ``mean(error**2)`` (squared runs),
then the code's fixed safeguard ``where(loss < 50, loss, sqrt(loss))``, then ALRC on
each image's loss, then the batch mean; Adam at its default betas, learning rate
0.1/128. The unstable-learning-rate run is squared error at batch 1 with Adam at 2e-3.

Scaled down for a 2-core CPU (the report says so): a quarter of the widths (16 and 32
channels), 16x16 crops of the photographs at half resolution instead of 32x32 CIFAR-10
images, and thousands of steps instead of 100 000. A convolution here is one matrix
product over its 3x3 or 5x5 patches: XLA's CPU convolutions are 13-30x slower at these
sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import optax_logdamp as old

from contenders import Base, build, contender
from photos import (
    distort,
    down_and_up,
    photographs,
    random_crops,
    standardize,
    test_crops,
    training_region,
)

CROP = 16
WIDTHS = (16, 32)  # the paper's (64, 128), a quarter
LEARNING_RATE = 0.1 / 128  # the paper's Adam rate
UNSTABLE_LEARNING_RATE = 2e-3  # the paper's unstable-rate run (squared error, batch 1)
QUARTIC_WEIGHT = 25.0
SAFEGUARD = 50.0  # the code's fixed cap: losses from here on become their square root
TEST_STRIDE = 8

Params = list[tuple[jax.Array, jax.Array]]

# The contenders, by registry name (``contenders.py``) on plain Adam. ``alrc`` caps the
# batch's mean loss (at batch 1 it is ``alrc_per_example`` exactly).
CONTENDERS: tuple[str, ...] = ("base", "alrc_per_example", "alrc", "spike_guard", "tuned clip")
CLIP_SWEEP = (0.1, 1.0, 10.0)


# ----------------------------------------------------------------------------- model


def kernel_shapes(widths: tuple[int, int] = WIDTHS) -> list[tuple[int, int, int, int]]:
    """The (height, width, in, out) of each convolution, input to output."""
    narrow, wide = widths
    return [
        (5, 5, 3, narrow),
        (3, 3, narrow, wide),
        *[(3, 3, wide, wide)] * 6,
        (3, 3, wide, narrow),
        (5, 5, narrow, 3),
    ]


def init_net(key: jax.Array, widths: tuple[int, int] = WIDTHS) -> Params:
    """Glorot-uniform kernels and zero biases (``tf.contrib.layers.conv2d``'s defaults)."""
    params = []
    shapes = kernel_shapes(widths)
    for k, (h, w, c_in, c_out) in zip(jax.random.split(key, len(shapes)), shapes, strict=True):
        limit = np.sqrt(6 / (h * w * (c_in + c_out)))
        kernel = jax.random.uniform(k, (h, w, c_in, c_out), minval=-limit, maxval=limit)
        params.append((kernel, jnp.zeros(c_out)))
    return params


def conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """A stride-1 'same' convolution (NHWC) as one matrix product over its patches."""
    k, _, _, c_out = kernel.shape
    pad = k // 2
    h, w = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    patches = jnp.concatenate(
        [padded[:, i : i + h, j : j + w] for i in range(k) for j in range(k)], axis=-1
    )
    return patches @ kernel.reshape(-1, c_out) + bias


def net(params: Params, x: jax.Array) -> jax.Array:
    """The paper's network: two convolutions, three residual blocks, two convolutions."""
    x = jax.nn.relu(conv(x, *params[0]))
    x = jax.nn.relu(conv(x, *params[1]))
    for block in range(3):
        skip = x
        x = jax.nn.relu(conv(x, *params[2 + 2 * block]))
        x = jax.nn.relu(conv(x, *params[3 + 2 * block])) + skip
    x = jax.nn.relu(conv(x, *params[8]))
    return conv(x, *params[9])


def image_losses(params: Params, targets: jax.Array, quartic: jax.Array) -> jax.Array:
    """Each image's error: ``25 * mean(e**4)`` (``quartic == 1``) or ``mean(e**2)``."""
    squared = jnp.square(net(params, down_and_up(targets)) - targets)
    quartic_loss = QUARTIC_WEIGHT * jnp.mean(jnp.square(squared), axis=(1, 2, 3))
    return jnp.where(quartic > 0, quartic_loss, jnp.mean(squared, axis=(1, 2, 3)))


def safeguard(losses: jax.Array) -> jax.Array:
    """The paper code's fixed cap: ``where(loss < 50, loss, sqrt(loss))``."""
    return jnp.where(losses < SAFEGUARD, losses, jnp.sqrt(losses))


# ------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Setting:
    """A training setting of the paper: loss, learning rate and batch size."""

    name: str
    quartic: bool
    learning_rate: float
    batch: int


def settings(batch_sizes: tuple[int, ...]) -> list[Setting]:
    """Quartic and squared error at each batch size, and the unstable-rate run."""
    out = []
    for batch in batch_sizes:
        out.append(Setting(f"quartic, batch {batch}", True, LEARNING_RATE, batch))
        out.append(Setting(f"squared, batch {batch}", False, LEARNING_RATE, batch))
    out.append(Setting("squared, batch 1, rate 2e-3", False, UNSTABLE_LEARNING_RATE, 1))
    return out


def runs_contender(name: str, setting: Setting) -> bool:
    """Whether a contender runs in a setting.

    Batch ALRC is per-example ALRC at batch 1, and runs at batch 4 only (at batch 16,
    the 2-core CPU's budget goes to the paper's form and the other defences).
    """
    return not (name == "alrc" and setting.batch != 4)


class Data(NamedTuple):
    """Where training crops come from, and the held-out test crops (standardized)."""

    region: jax.Array  # shape=(2, 213, 240, 3): the photographs less their held-out strip
    test: jax.Array  # shape=(N, 16, 16, 3)


def load_data() -> Data:
    images = photographs()
    test = standardize(jnp.asarray(test_crops(images, CROP, TEST_STRIDE)))
    return Data(jnp.asarray(training_region(images)), test)


def training_batch(key: jax.Array, region: jax.Array, batch: int) -> jax.Array:
    """One step's targets: random crops, flipped, distorted, standardized."""
    k_crop, k_distort = jax.random.split(key)
    return standardize(distort(k_distort, random_crops(k_crop, region, CROP, batch)))


# ------------------------------------------------------------------------- training


class Run(NamedTuple):
    """One row per training run (setting x seed) once stacked."""

    init_key: jax.Array  # uint32 key data: the network's initialisation
    data_key: jax.Array  # uint32 key data: the crops of every step
    quartic: jax.Array  # float32: 1 for the quartic loss
    learning_rate: jax.Array  # float32
    hyper: jax.Array  # float32: the tuned clip's threshold (0 for the others)


class Trained(NamedTuple):
    train_loss: Any  # shape=(steps,): the batch's mean raw loss (before the safeguard)
    test_error: Any  # shape=(): held-out error in the run's own loss
    num_capped: Any  # shape=(): steps (or images) a defence scaled down; -1: none


def make_run(seed: int, setting: Setting, hyper: float = 0.0) -> dict[str, np.ndarray]:
    """A run's fields: every contender of a seed shares its keys, hence its crops."""
    key_data = lambda k: np.asarray(jax.random.key_data(k))  # noqa: E731
    init, data = jax.random.split(jax.random.key(seed))
    return {
        "init_key": key_data(init),
        "data_key": key_data(data),
        "quartic": np.float32(setting.quartic),
        "learning_rate": np.float32(setting.learning_rate),
        "hyper": np.float32(hyper),
    }


def stack(rows: list[dict[str, np.ndarray]]) -> Run:
    return Run(**{f: jnp.asarray(np.stack([r[f] for r in rows])) for f in Run._fields})


def train_one(name: str, data: Data, steps: int, batch: int, run: Run) -> Trained:
    """One training run, traced (vmapped over runs by :func:`train_runs`)."""
    params = init_net(jax.random.wrap_key_data(run.init_key))
    tx = build(name, Base(run.learning_rate), run.hyper)
    per_example = contender(name).per_example
    data_key = jax.random.wrap_key_data(run.data_key)

    def step(carry, t):
        params, opt_state = carry
        targets = training_batch(jax.random.fold_in(data_key, t), data.region, batch)

        def loss_fn(p):
            raw = image_losses(p, targets, run.quartic)
            losses = safeguard(raw)
            capped = old.cap_losses(losses, opt_state) if per_example else losses
            return capped.mean(), (raw, losses)

        (_, (raw, losses)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        value = losses if per_example else losses.mean()
        updates, opt_state = tx.update(grads, opt_state, params, value=value)
        return (optax.apply_updates(params, updates), opt_state), raw.mean()

    (params, opt_state), train_loss = lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
    test_error = jnp.mean(image_losses(params, data.test, run.quartic))
    return Trained(train_loss, test_error, count_capped(opt_state))


def count_capped(opt_state: Any) -> jax.Array:
    """How often the ALRC statistics capped a loss or a norm (-1 where there are none)."""
    diagnostics = old.diagnostics(opt_state)
    counts = [v for k, v in diagnostics.items() if k.endswith("num_clipped")]
    return sum(counts) if counts else jnp.asarray(-1)


def train_runs(name: str, data: Data, steps: int, batch: int, runs: Run) -> Trained:
    """Every run of one contender at one batch size: one compiled, vmapped scan."""
    trained = jax.jit(jax.vmap(lambda run: train_one(name, data, steps, batch, run)))(runs)
    return Trained(*(np.asarray(field) for field in trained))

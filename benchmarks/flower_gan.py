"""Log dampening where it was born: a deep GAN generating flowers.

The LogAdam post trained "a 46-layer GAN to generate flowers". Here: 16x16 crops of
the flower photograph scikit-learn ships (``photos.py``, at half resolution, its right
quarter held out), a generator and a discriminator that are residual MLPs of
:data:`BLOCKS` blocks of two layers each (``2 * BLOCKS + 2`` layers apiece, 44 in all
by default), no normalisation layers, the non-saturating GAN loss, Adam with
``b1 = 0.5`` (the GAN convention) on both networks at a rate where plain Adam is
unstable. Every contender trains both networks with its own optimizer.

What a run records: both losses at every step, and at the end a sample-quality score
and a diversity ratio against held-out crops (:func:`kid` and :func:`diversity`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from contenders import Base, build
from photos import photographs, random_crops, test_crops, training_region

CROP = 16
PIXELS = CROP * CROP * 3
LATENT = 64
WIDTH = 128
BLOCKS = 10  # residual blocks of two layers, per network
BATCH = 32
B1 = 0.5  # Adam's b1 for GANs (Radford et al.)
LEARNING_RATES = (1e-3, 3e-3)  # plain Adam trains with spikes at the first, fails at the second
OUT_GAIN = 0.1  # the output layer starts small: no saturated tanh, no confident logits
FLOWER = 1  # the flower photograph's index in load_sample_images()
TEST_STRIDE = 4
NUM_SAMPLES = 512  # generated samples scored per run
FEATURES = 512  # random ReLU features the score compares

# The contenders, by registry name on Adam (b1 0.5). With plain Adam as the base,
# ``log_dampen`` in front is ``logadam`` at the post's knee and ``log_dampen(auto)`` is
# ``logadam(dampen_scale="auto")``; ``tuned clip`` runs at the usual threshold of 1.0.
CONTENDERS: tuple[str, ...] = (
    "base",
    "log_dampen",
    "log_dampen(auto)",
    "spike_guard",
    "tuned clip",
)
CLIP = 1.0

Params = dict[str, Any]


# ----------------------------------------------------------------------------- models


def init_mlp(key: jax.Array, n_in: int, n_out: int) -> Params:
    """A residual MLP: a dense layer in, :data:`BLOCKS` blocks, a dense layer out.

    He-normal weights; the second layer of each block starts scaled by
    ``1 / sqrt(BLOCKS)`` so that the residual stream does not grow with depth, and the
    output layer by :data:`OUT_GAIN`.
    """
    keys = jax.random.split(key, 2 * BLOCKS + 2)

    def dense(k, a, b, gain=1.0):
        return {"w": gain * jax.random.normal(k, (a, b)) * np.sqrt(2 / a), "b": jnp.zeros(b)}

    return {
        "in": dense(keys[0], n_in, WIDTH),
        "blocks": [
            (
                dense(keys[1 + 2 * i], WIDTH, WIDTH),
                dense(keys[2 + 2 * i], WIDTH, WIDTH, 1 / np.sqrt(BLOCKS)),
            )
            for i in range(BLOCKS)
        ],
        "out": dense(keys[-1], WIDTH, n_out, OUT_GAIN),
    }


def mlp(params: Params, x: jax.Array, activation) -> jax.Array:
    x = x @ params["in"]["w"] + params["in"]["b"]
    for first, second in params["blocks"]:
        h = activation(x) @ first["w"] + first["b"]
        x = x + activation(h) @ second["w"] + second["b"]
    return activation(x) @ params["out"]["w"] + params["out"]["b"]


def generate(params: Params, z: jax.Array) -> jax.Array:
    """Images in [-1, 1] from latent codes, shape (n, 16, 16, 3)."""
    return jnp.tanh(mlp(params, z, jax.nn.relu)).reshape(-1, CROP, CROP, 3)


def discriminate(params: Params, images: jax.Array) -> jax.Array:
    """One logit per image: real (> 0) or generated."""
    leaky = lambda x: jax.nn.leaky_relu(x, 0.2)  # noqa: E731
    return mlp(params, images.reshape(len(images), -1), leaky)[:, 0]


def d_loss(d_params: Params, real: jax.Array, fake: jax.Array) -> jax.Array:
    return jnp.mean(jax.nn.softplus(-discriminate(d_params, real))) + jnp.mean(
        jax.nn.softplus(discriminate(d_params, fake))
    )


def g_loss(g_params: Params, d_params: Params, z: jax.Array) -> jax.Array:
    """The non-saturating generator loss."""
    return jnp.mean(jax.nn.softplus(-discriminate(d_params, generate(g_params, z))))


# ----------------------------------------------------------------------------- scores


def feature_map() -> jax.Array:
    """A fixed random projection (the same for every run): features are ReLU(x @ W)."""
    return jax.random.normal(jax.random.key(2024), (PIXELS, FEATURES)) / np.sqrt(PIXELS)


def kid(x: jax.Array, y: jax.Array, projection: jax.Array) -> jax.Array:
    """Kernel two-sample statistic of two sets of images, x1000 (lower: more alike).

    The unbiased squared MMD with KID's cubic kernel ``(a.b / d + 1)**3`` between the
    random ReLU features of the two sets.
    """
    fx = jax.nn.relu(x.reshape(len(x), -1) @ projection)
    fy = jax.nn.relu(y.reshape(len(y), -1) @ projection)
    kernel = lambda a, b: (a @ b.T / FEATURES + 1) ** 3  # noqa: E731
    m, n = len(fx), len(fy)
    kxx, kyy, kxy = kernel(fx, fx), kernel(fy, fy), kernel(fx, fy)
    mmd = (
        (kxx.sum() - jnp.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - jnp.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )
    return 1000 * mmd


def diversity(images: jax.Array) -> jax.Array:
    """The mean distance between two images of a set (0, up to rounding, when all are one)."""
    flat = images.reshape(len(images), -1)
    sq = jnp.sum(flat**2, axis=1)
    dist = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None] - 2 * flat @ flat.T, 0.0))
    n = len(flat)
    return dist.sum() / (n * (n - 1))


# ------------------------------------------------------------------------------ data


class Data(NamedTuple):
    region: jax.Array  # shape=(1, 213, 240, 3): the flower, less its held-out strip, in [-1, 1]
    test: jax.Array  # shape=(N, 16, 16, 3): held-out crops in [-1, 1]


def load_data() -> Data:
    flower = photographs()[FLOWER : FLOWER + 1] * 2 - 1
    return Data(
        jnp.asarray(training_region(flower)), jnp.asarray(test_crops(flower, CROP, TEST_STRIDE))
    )


# -------------------------------------------------------------------------- training


class Trained(NamedTuple):
    d_loss: Any  # shape=(steps,)
    g_loss: Any  # shape=(steps,)
    kid: Any  # shape=(): generated samples against the held-out crops
    diversity: Any  # shape=(): of the generated samples, relative to the held-out crops'
    samples: Any  # shape=(16, 16, 16, 3): the first generated samples, for the figure


def train_one(
    name: str, data: Data, steps: int, learning_rate: float, seed_key: jax.Array
) -> Trained:
    """One GAN training run (traced; vmapped over seeds by :func:`train_seeds`)."""
    k_g, k_d, k_data, k_score = jax.random.split(jax.random.wrap_key_data(seed_key), 4)
    g_params = init_mlp(k_g, LATENT, PIXELS)
    d_params = init_mlp(k_d, PIXELS, 1)
    base = Base(learning_rate, b1=B1)
    g_tx, d_tx = build(name, base, CLIP), build(name, base, CLIP)

    def step(carry, t):
        g_params, d_params, g_state, d_state = carry
        k_real, k_z1, k_z2 = jax.random.split(jax.random.fold_in(k_data, t), 3)
        real = random_crops(k_real, data.region, CROP, BATCH)
        fake = generate(g_params, jax.random.normal(k_z1, (BATCH, LATENT)))
        dl, d_grads = jax.value_and_grad(d_loss)(d_params, real, fake)
        d_updates, d_state = d_tx.update(d_grads, d_state, d_params, value=dl)
        d_params = optax.apply_updates(d_params, d_updates)
        z = jax.random.normal(k_z2, (BATCH, LATENT))
        gl, g_grads = jax.value_and_grad(g_loss)(g_params, d_params, z)
        g_updates, g_state = g_tx.update(g_grads, g_state, g_params, value=gl)
        g_params = optax.apply_updates(g_params, g_updates)
        return (g_params, d_params, g_state, d_state), (dl, gl)

    init = (g_params, d_params, g_tx.init(g_params), d_tx.init(d_params))
    (g_params, *_), (d_losses, g_losses) = lax.scan(step, init, jnp.arange(steps))
    samples = generate(g_params, jax.random.normal(k_score, (NUM_SAMPLES, LATENT)))
    score = kid(samples, data.test, feature_map())
    relative_diversity = diversity(samples) / diversity(data.test)
    return Trained(d_losses, g_losses, score, relative_diversity, samples[:16])


def train_seeds(
    name: str, data: Data, steps: int, learning_rate: float, seeds: list[int]
) -> Trained:
    """Every seed of one contender: one compiled, vmapped scan."""
    keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
    run = jax.jit(jax.vmap(lambda k: train_one(name, data, steps, learning_rate, k)))
    return Trained(*(np.asarray(field) for field in run(keys)))

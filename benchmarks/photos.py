"""Natural images for the papers' experiments: the two photographs scikit-learn ships.

``sklearn.datasets.load_sample_images()`` holds two 427x640 colour photographs (a
Chinese temple and a flower), installed with the package: nothing is downloaded. Both
experiments of ``papers_benchmark.py`` cut small crops from them:

- the photographs are averaged down 2x (to 213x320), so that a 16x16 crop covers the
  piece of a scene a 32x32 crop covers at full size;
- the right-most quarter of each photograph (its last :data:`TEST_COLUMNS` columns) is
  held out: training crops come from the other three quarters only, test crops tile the
  held-out strip on a fixed grid;
- training crops are drawn inside the jitted training step from a key (the seed and the
  step), so every contender of a seed sees the same crops in the same order.

The augmentation is the one of the ALRC paper's code (TensorFlow's CIFAR-10 input
pipeline): a random crop, a random left-right flip, a random brightness shift of up to
63/255, a random contrast factor in [0.2, 1.8], then per-image standardization.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DOWNSCALE = 2  # the photographs are averaged over 2x2 pixel blocks
TEST_COLUMNS = 80  # the held-out strip at the right of each photograph (a quarter)
MAX_BRIGHTNESS = 63 / 255
CONTRAST_RANGE = (0.2, 1.8)


@functools.cache
def photographs() -> np.ndarray:
    """The two photographs, averaged down 2x: float32 in [0, 1], shape (2, 213, 320, 3)."""
    from sklearn.datasets import load_sample_images

    images = np.stack(load_sample_images().images).astype(np.float32) / 255
    n, h, w, c = images.shape
    h, w = h // DOWNSCALE, w // DOWNSCALE
    blocks = images[:, : h * DOWNSCALE, : w * DOWNSCALE].reshape(n, h, DOWNSCALE, w, DOWNSCALE, c)
    return blocks.mean(axis=(2, 4))


def training_region(images: np.ndarray) -> np.ndarray:
    """The part of each photograph training crops come from (all but the held-out strip)."""
    return images[:, :, :-TEST_COLUMNS]


def test_crops(images: np.ndarray, size: int, stride: int) -> np.ndarray:
    """Crops of ``size`` tiling the held-out strip of each photograph every ``stride`` pixels.

    Returns float32 in [0, 1], shape (N, size, size, 3), photograph by photograph, row by
    row: the same crops on every call.
    """
    strip = images[:, :, -TEST_COLUMNS:]
    _, h, w, _ = strip.shape
    return np.stack(
        [
            strip[i, y : y + size, x : x + size]
            for i in range(len(strip))
            for y in range(0, h - size + 1, stride)
            for x in range(0, w - size + 1, stride)
        ]
    )


def random_crops(key: jax.Array, region: jax.Array, size: int, batch: int) -> jax.Array:
    """``batch`` crops of ``size`` at random places of random photographs of ``region``,
    each flipped left-right with probability 1/2 (traceable; shape (batch, size, size, 3))."""
    n, h, w, c = region.shape
    k_image, k_y, k_x, k_flip = jax.random.split(key, 4)
    image = jax.random.randint(k_image, (batch,), 0, n)
    y = jax.random.randint(k_y, (batch,), 0, h - size + 1)
    x = jax.random.randint(k_x, (batch,), 0, w - size + 1)

    def crop(i, y0, x0):
        return jax.lax.dynamic_slice(region[i], (y0, x0, 0), (size, size, c))

    crops = jax.vmap(crop)(image, y, x)
    flip = jax.random.bernoulli(k_flip, 0.5, (batch,))
    return jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)


def distort(key: jax.Array, crops: jax.Array) -> jax.Array:
    """Random brightness and contrast per crop (TensorFlow's ``adjust_brightness`` and
    ``adjust_contrast``: a shift, then a scaling about each channel's mean)."""
    batch = crops.shape[0]
    k_bright, k_contrast = jax.random.split(key)
    shift = jax.random.uniform(
        k_bright, (batch, 1, 1, 1), minval=-MAX_BRIGHTNESS, maxval=MAX_BRIGHTNESS
    )
    factor = jax.random.uniform(
        k_contrast, (batch, 1, 1, 1), minval=CONTRAST_RANGE[0], maxval=CONTRAST_RANGE[1]
    )
    crops = crops + shift
    mean = crops.mean(axis=(1, 2), keepdims=True)
    return (crops - mean) * factor + mean


def standardize(crops: jax.Array) -> jax.Array:
    """TensorFlow's ``per_image_standardization``: zero mean, unit variance per crop
    (the standard deviation floored at 1/sqrt(pixels), for flat crops)."""
    axes = tuple(range(1, crops.ndim))
    mean = crops.mean(axis=axes, keepdims=True)
    std = crops.std(axis=axes, keepdims=True)
    floor = 1 / np.sqrt(np.prod(crops.shape[1:]))
    return (crops - mean) / jnp.maximum(std, floor)


def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Bilinear resampling with aligned corners (TensorFlow 1's ``resize_images(...,
    align_corners=True)``, the ALRC code's) as a (size_out, size_in) matrix."""
    matrix = np.zeros((size_out, size_in), np.float32)
    scale = (size_in - 1) / (size_out - 1)
    for i in range(size_out):
        position = i * scale
        low = min(int(np.floor(position)), size_in - 2)
        frac = position - low
        matrix[i, low] += 1 - frac
        matrix[i, low + 1] += frac
    return matrix


def down_and_up(images: jax.Array) -> jax.Array:
    """Each image resized down 2x and back up, bilinearly: the super-sampling input."""
    size = images.shape[1]
    resample = resize_matrix(size // 2, size) @ resize_matrix(size, size // 2)
    return jnp.einsum("ai,bj,nijc->nabc", resample, resample, images)

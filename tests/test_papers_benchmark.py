"""benchmarks/papers_benchmark.py: the photographs' pipeline, the paper's loss, the spike
count, the GAN's scores, and a tiny run of the quick form."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "papers_benchmark.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import flower_gan as gan  # noqa: E402
import photos  # noqa: E402
import supersampling as ss  # noqa: E402
from reporting import count_spikes  # noqa: E402

# ---------------------------------------------------------------------------- data


def test_photographs_are_the_two_shipped_ones_at_half_resolution():
    images = photos.photographs()
    assert images.shape == (2, 213, 320, 3) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1
    assert images.std() > 0.1  # photographs, not a blank canvas


def test_training_never_sees_the_held_out_strip():
    images = photos.photographs()
    data = ss.load_data()
    train_columns = data.region.shape[2]
    assert train_columns == images.shape[2] - photos.TEST_COLUMNS
    np.testing.assert_array_equal(data.region, images[:, :, :train_columns])
    # Every test crop is a window of the strip, on the grid, photograph by photograph.
    raw = photos.test_crops(images, ss.CROP, ss.TEST_STRIDE)
    rows = (213 - ss.CROP) // ss.TEST_STRIDE + 1
    cols = (photos.TEST_COLUMNS - ss.CROP) // ss.TEST_STRIDE + 1
    assert raw.shape == (2 * rows * cols, ss.CROP, ss.CROP, 3)
    last = raw[rows * cols - 1]  # photograph 0, bottom right of the strip
    y, x = (rows - 1) * ss.TEST_STRIDE, images.shape[2] - photos.TEST_COLUMNS
    x += (cols - 1) * ss.TEST_STRIDE
    np.testing.assert_array_equal(last, images[0, y : y + ss.CROP, x : x + ss.CROP])
    # The GAN's data: the flower alone, the same split, in [-1, 1].
    flower = gan.load_data()
    assert flower.region.shape == (1, 213, train_columns, 3)
    np.testing.assert_allclose(flower.region[0], images[1, :, :train_columns] * 2 - 1, atol=1e-6)


def test_random_crops_are_windows_of_the_region_or_their_mirror():
    # A region whose pixel values encode their position: 1000 * row + column.
    h, w, size = 20, 24, 6
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    region = np.broadcast_to((1000 * rows + cols)[None, :, :, None], (2, h, w, 3)).astype(
        np.float32
    )
    region = region + np.array([0, 0.5])[:, None, None, None].astype(np.float32)  # which photo
    crops = np.asarray(photos.random_crops(jax.random.key(0), jnp.asarray(region), size, 64))
    assert crops.shape == (64, size, size, 3)
    flipped = 0
    for crop in crops:
        image = round(2 * (crop[0, 0, 0] % 1))
        corner = crop[0, 0, 0] - 0.5 * image
        y = int(corner // 1000)
        left, right = int(corner % 1000), int(crop[0, -1, 0] - 0.5 * image) % 1000
        x = min(left, right)
        window = region[image, y : y + size, x : x + size]
        assert window.shape == crop.shape  # inside the region: no clamped start
        if left > right:
            window, flipped = window[:, ::-1], flipped + 1
        np.testing.assert_array_equal(crop, window)
    assert 0 < flipped < 64


def test_training_batches_are_deterministic_and_change_every_step():
    data = ss.load_data()
    key = jax.random.wrap_key_data(ss.make_run(3, ss.settings((4,))[0])["data_key"])
    first = ss.training_batch(jax.random.fold_in(key, 7), data.region, 4)
    again = ss.training_batch(jax.random.fold_in(key, 7), data.region, 4)
    later = ss.training_batch(jax.random.fold_in(key, 8), data.region, 4)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, later)
    # Every contender of a seed gets the same keys, whatever the setting or threshold.
    a = ss.make_run(3, ss.settings((1,))[0])
    b = ss.make_run(3, ss.settings((1,))[1], hyper=1.0)
    for field in ("init_key", "data_key"):
        np.testing.assert_array_equal(a[field], b[field])
    assert not np.array_equal(a["data_key"], ss.make_run(4, ss.settings((1,))[0])["data_key"])


def test_standardize_gives_zero_mean_unit_variance_and_survives_a_flat_crop():
    crops = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3)) * 5 + 2
    crops = crops.at[2].set(0.7)  # flat: the floor on the deviation, no division by 0
    out = np.asarray(photos.standardize(crops))
    np.testing.assert_allclose(out[:2].mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(out[:2].std(axis=(1, 2, 3)), 1, atol=1e-4)
    np.testing.assert_allclose(out[2], 0, atol=1e-4)  # rounding of the mean, not 1/0


def test_down_and_up_keeps_corners_and_linear_ramps():
    matrix = photos.resize_matrix(16, 8)
    np.testing.assert_allclose(matrix.sum(axis=1), 1, atol=1e-6)
    assert matrix[0, 0] == 1 and matrix[-1, -1] == 1  # aligned corners
    ramp = np.broadcast_to(
        np.linspace(-1, 1, 16, dtype=np.float32)[None, :, None, None], (1, 16, 16, 3)
    )
    np.testing.assert_allclose(photos.down_and_up(jnp.asarray(ramp)), ramp, atol=1e-5)
    detail = np.zeros((1, 16, 16, 3), np.float32)
    detail[0, 5, 5] = 1  # a single pixel does not survive the round trip
    assert float(photos.down_and_up(jnp.asarray(detail))[0, 5, 5, 0]) < 1


# ---------------------------------------------------------------------------- loss


def test_image_losses_are_the_papers_quartic_and_squared_error():
    targets = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
    zero = jax.tree.map(jnp.zeros_like, ss.init_net(jax.random.key(0)))  # predicts 0
    quartic = ss.image_losses(zero, targets, jnp.float32(1))
    squared = ss.image_losses(zero, targets, jnp.float32(0))
    np.testing.assert_allclose(
        quartic, 25 * np.mean(np.asarray(targets) ** 4, axis=(1, 2, 3)), rtol=1e-5
    )
    np.testing.assert_allclose(
        squared, np.mean(np.asarray(targets) ** 2, axis=(1, 2, 3)), rtol=1e-5
    )
    prediction = ss.net(ss.init_net(jax.random.key(0)), targets)
    assert prediction.shape == targets.shape


def test_safeguard_is_the_codes_fixed_cap():
    losses = jnp.array([0.5, 49.0, 50.0, 400.0])
    np.testing.assert_allclose(ss.safeguard(losses), [0.5, 49.0, np.sqrt(50.0), 20.0], rtol=1e-6)
    grads = jax.vmap(jax.grad(lambda x: ss.safeguard(x)))(losses)
    np.testing.assert_allclose(grads, [1, 1, 0.5 / np.sqrt(50.0), 0.5 / 20], rtol=1e-6)


# ---------------------------------------------------------------------------- spikes


def test_count_spikes():
    flat = np.ones(300)
    assert count_spikes(flat) == 0
    one = flat.copy()
    one[150] = 20
    assert count_spikes(one) == 1
    run = flat.copy()
    run[150:155] = 20  # five steps in a row: one spike
    run[200] = np.nan  # a non-finite loss is a spike
    assert count_spikes(run) == 2
    early = flat.copy()
    early[50] = 100  # inside the first window: no median to judge it by
    assert count_spikes(early) == 0
    assert count_spikes(one * 0.01, floor=10.0) == 0  # below the floor


# ------------------------------------------------------------------------------- GAN


def test_gan_scores():
    real = gan.load_data().test
    projection = gan.feature_map()
    half = len(real) // 2
    same = float(gan.kid(real[:half], real[half:], projection))
    noise = jax.random.uniform(jax.random.key(0), real[:half].shape, minval=-1, maxval=1)
    different = float(gan.kid(noise, real[half:], projection))
    assert different > 10 * abs(same)
    # Identical images: 0 up to the rounding of the distances' Gram-matrix form.
    copies = float(gan.diversity(jnp.broadcast_to(real[:1], (8, *real.shape[1:]))))
    assert copies < 1e-2 * float(gan.diversity(real))


def test_gan_networks_have_tens_of_layers():
    g = gan.init_mlp(jax.random.key(0), gan.LATENT, gan.PIXELS)
    d = gan.init_mlp(jax.random.key(1), gan.PIXELS, 1)
    layers = lambda p: 2 + 2 * len(p["blocks"])  # noqa: E731
    assert layers(g) + layers(d) == 44
    images = gan.generate(g, jnp.zeros((2, gan.LATENT)))
    assert images.shape == (2, 16, 16, 3) and float(jnp.abs(images).max()) <= 1
    assert gan.discriminate(d, images).shape == (2,)


# ------------------------------------------------------------------------- quick run


def test_tiny_quick_run_writes_report_figures_and_record(tmp_path):
    # Low XLA optimisation: the programs compile ~3x faster. The spike count's 100-step
    # window is test_count_spikes's: 31 steps are enough to write every part.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    command = [sys.executable, str(SCRIPT), "--steps", "31", "--seeds", "2"]
    subprocess.run([*command, "--out", str(tmp_path), "--quiet"], check=True, env=env, timeout=600)

    report = (tmp_path / "papers.md").read_text()
    assert "## ALRC: 2x super-sampling" in report and "## Log dampening: a 44-layer GAN" in report
    for claim in ("unstable quartic-error training", "unaffected", "unstable learning rate"):
        assert claim in report
    verdicts = [line for line in report.splitlines() if line.endswith("reproduced |")]
    assert len(verdicts) == 3 + 1  # quartic, squared, unstable rate at batch 1; one GAN rate
    assert "SPEC" not in report and "Machine:" in report
    for figure in ("alrc_curves.png", "gan.png"):
        data = (tmp_path / figure).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    record = json.loads((tmp_path / "papers.json").read_text())
    assert len(record["alrc_errors"]["base | quartic, batch 1"]) == 2
    assert set(record["gan"]) == {
        f"{n} | 0.003" for n in ("base", "log_dampen", "log_dampen(auto)", "spike_guard")
    }

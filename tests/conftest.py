"""Test configuration: 8 simulated CPU devices.

The device count must be fixed before jax is first imported, so it is set here,
at the top of the first module pytest imports.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

# optax itself relies on standard promotion (``decay**count`` mixes float and
# int32), so strict promotion is switched on per test for this library's own code
# (``jax.numpy_dtype_promotion("strict")``), not globally.

import hypothesis  # noqa: E402

# CI runs derandomized so that a red build is reproducible; locally, explore.
hypothesis.settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")

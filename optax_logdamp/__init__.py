"""optax_logdamp: spike-proof training for JAX, as composable Optax transforms.

The recommended defence goes in front of the optimizer you already have::

  tx = optax.chain(spike_guard(), optax.clip_by_global_norm(1.0), optax.adamw(schedule))

- :func:`spike_guard`: the recommended defence, one front transform for any optimizer:
  ALRC on the global gradient norm.
- :func:`log_dampen`: every gradient element ``g`` becomes ``s*sign(g)*log1p(|g|/s)``.
- :func:`alrc`: adaptive learning rate clipping of the loss or the gradient norm
  (Ede & Beanland).
- :func:`alrc_per_example` and :func:`cap_losses`: ALRC applied to each example.
- :func:`logadam` and :func:`logadamw`: log dampening chained into Adam and AdamW.
- :func:`diagnostics`: how often the defences in an optimizer state acted, for logging,
  and :func:`to_python_numbers` to print or log them as plain numbers.
"""

from optax_logdamp._aliases import logadam as logadam
from optax_logdamp._aliases import logadamw as logadamw
from optax_logdamp._alrc import ALRCPerExampleState as ALRCPerExampleState
from optax_logdamp._alrc import alrc as alrc
from optax_logdamp._alrc import alrc_per_example as alrc_per_example
from optax_logdamp._alrc import cap_losses as cap_losses
from optax_logdamp._dampening import LogDampenState as LogDampenState
from optax_logdamp._dampening import dampen as dampen
from optax_logdamp._dampening import log_dampen as log_dampen
from optax_logdamp._diagnostics import diagnostics as diagnostics
from optax_logdamp._diagnostics import to_python_numbers as to_python_numbers
from optax_logdamp._spike_guard import spike_guard as spike_guard
from optax_logdamp._statistics import ALRCSignalsState as ALRCSignalsState
from optax_logdamp._statistics import ALRCState as ALRCState

__version__ = "0.1.0"

__all__ = [
    "ALRCPerExampleState",
    "ALRCSignalsState",
    "ALRCState",
    "LogDampenState",
    "alrc",
    "alrc_per_example",
    "cap_losses",
    "dampen",
    "diagnostics",
    "log_dampen",
    "logadam",
    "logadamw",
    "spike_guard",
    "to_python_numbers",
]

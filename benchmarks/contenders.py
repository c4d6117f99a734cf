"""One registry of the contenders every benchmark compares: name -> factory.

A contender is a defence added to a *base* optimizer: the training recipe a user
already has. :class:`Base` describes that recipe (Adam or AdamW, a learning rate or a
schedule, and the recipe's own ``clip_by_global_norm`` if it has one), and each entry
of :data:`REGISTRY` builds the whole optimizer from it:

- ``base``: the recipe as it is;
- a front transform of this package added in front of the recipe, its clip kept
  (``spike_guard``, ``alrc(grad_norm)``, ``log_dampen(auto)``, ...);
- ``... (no clip)``: the same front transform replacing the recipe's clip;
- ``spike_guard (on the update)``: the guard after Adam's scaling, before the weight
  decay and the learning rate, judging the update instead of the gradient;
- the anchors (``anchors.py``), each at its published defaults: ZClip, AdaGC and SPAM
  replace the clip (they are clipping rules of their own), StableAdamW's update
  clipping replaces Adam's scaling, skip-step wraps the recipe (OLMo 2 and Levanter use
  it together with the clip).

With plain Adam as the base (no clip), ``log_dampen`` in front is ``logadam`` and
``log_dampen(auto)`` in front is ``logadam(dampen_scale="auto")``, bitwise.

Every benchmark script (``lm_spike_benchmark.py``, ``spike_benchmark.py``,
``step_overhead.py``) names its contenders from this registry, so a name means the
same optimizer everywhere (``tests/test_benchmark_registry.py`` checks it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

import optax_logdamp as old

from anchors import adagc, skip_step_on_spikes, spam, update_clipping, zclip


def matrices_only(params: Any) -> Any:
    """The weight-decay mask of the standard recipe: parameters with ``ndim >= 2``."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


@dataclasses.dataclass(frozen=True)
class Base:
    """The recipe a defence is added to: Adam or AdamW, and optionally a global clip.

    Attributes:
      learning_rate: a rate or a schedule (may be traced: benchmarks vmap over it).
      b1, b2, eps: Adam's.
      weight_decay: AdamW's decoupled weight decay (0: plain Adam), on matrices only.
      clip: the recipe's ``clip_by_global_norm`` threshold, or ``None``.
    """

    learning_rate: optax.ScalarOrSchedule
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float | None = None

    def tail(self, scaling: optax.GradientTransformation | None = None):
        """Adam's scaling (or ``scaling``), the weight decay, the learning rate.

        With the default scaling this is ``optax.adamw`` (``optax.adam`` without weight
        decay), transform for transform.
        """
        if scaling is None:
            scaling = optax.scale_by_adam(b1=self.b1, b2=self.b2, eps=self.eps)
        decay = (
            [optax.add_decayed_weights(self.weight_decay, matrices_only)]
            if self.weight_decay
            else []
        )
        return optax.chain(scaling, *decay, optax.scale_by_learning_rate(self.learning_rate))

    def optimizer(self):
        """The optimizer without the recipe's clip."""
        return self.tail()

    def recipe(self, *front: optax.GradientTransformation):
        """``front`` transforms, then the recipe's clip (if any), then the optimizer."""
        clip = [] if self.clip is None else [optax.clip_by_global_norm(self.clip)]
        return optax.chain(*front, *clip, self.optimizer())


AGC_CLIPPING = 0.01  # optax.adaptive_grad_clip's clipping ratio (Brock et al. use 0.01)

Factory = Callable[[Base, Any], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Contender:
    """A registry entry: ``make(base, hyper) -> optimizer``.

    Attributes:
      name: the one spelling every benchmark and table uses.
      make: builds the optimizer; ``hyper`` is the value a sweep tunes (``tuned``).
      tuned: whether ``hyper`` is swept on clean data (only the tuned clip).
      anchor: one of the published systems users would pick instead.
      per_example: caps each example's loss with ``cap_losses`` inside the loss, and
        takes the per-example losses as ``value``.
    """

    name: str
    make: Factory
    tuned: bool = False
    anchor: bool = False
    per_example: bool = False


def _front(*make_front: Callable[[], optax.GradientTransformation]) -> Factory:
    """A factory that puts the fronts in front of the recipe, its clip kept."""
    return lambda base, hyper: base.recipe(*(f() for f in make_front))


def _replacing_clip(*make_front: Callable[[], optax.GradientTransformation]) -> Factory:
    """A factory that puts the fronts in place of the recipe's clip."""
    return lambda base, hyper: optax.chain(*(f() for f in make_front), base.optimizer())


def _guarding_updates(base: Base, hyper: Any) -> optax.GradientTransformation:
    """``spike_guard()`` between Adam's scaling and the rest of the recipe: it judges the
    norm of Adam's update direction, not of the gradient (the recipe's clip kept)."""
    scaling = optax.scale_by_adam(b1=base.b1, b2=base.b2, eps=base.eps)
    clip = [] if base.clip is None else [optax.clip_by_global_norm(base.clip)]
    return optax.chain(*clip, base.tail(optax.chain(scaling, old.spike_guard())))


_ALRC_NORM = lambda: old.alrc(signal="grad_norm")  # noqa: E731
_ALRC_BOTH = lambda: old.alrc(signal="both")  # noqa: E731
_AUTO = lambda: old.log_dampen("auto")  # noqa: E731

_ENTRIES: tuple[Contender, ...] = (
    Contender("base", lambda base, hyper: base.recipe()),
    Contender("base (no clip)", lambda base, hyper: base.optimizer()),
    Contender(
        "tuned clip",
        lambda base, hyper: optax.chain(optax.clip_by_global_norm(hyper), base.optimizer()),
        tuned=True,
    ),
    # This package's defences in front of the recipe (its clip kept).
    Contender("spike_guard", _front(old.spike_guard)),
    Contender("alrc(grad_norm)", _front(_ALRC_NORM)),
    Contender("alrc(both)", _front(_ALRC_BOTH)),
    Contender("alrc(both) + log_dampen(auto)", _front(_ALRC_BOTH, _AUTO)),
    Contender("log_dampen(auto)", _front(_AUTO)),
    Contender("alrc", _front(old.alrc)),
    Contender("log_dampen", _front(old.log_dampen)),
    Contender("alrc + log_dampen", _front(old.alrc, old.log_dampen)),
    Contender("alrc_per_example", _front(old.alrc_per_example), per_example=True),
    Contender("spike_guard (on the update)", _guarding_updates),
    # ... replacing the recipe's clip.
    Contender("spike_guard (no clip)", _replacing_clip(old.spike_guard)),
    Contender("alrc(grad_norm) (no clip)", _replacing_clip(_ALRC_NORM)),
    Contender("alrc(both) (no clip)", _replacing_clip(_ALRC_BOTH)),
    Contender("log_dampen(auto) (no clip)", _replacing_clip(_AUTO)),
    # The anchors, at their published defaults.
    Contender("zclip", _replacing_clip(zclip), anchor=True),
    Contender(
        "adaptive_grad_clip",
        _replacing_clip(lambda: optax.adaptive_grad_clip(AGC_CLIPPING)),
        anchor=True,
    ),
    Contender("adagc", _replacing_clip(adagc), anchor=True),
    Contender("skip-step", lambda base, hyper: skip_step_on_spikes(base.recipe()), anchor=True),
    Contender(
        "update clipping",
        lambda base, hyper: base.tail(update_clipping(base.b1, base.b2, base.eps)),
        anchor=True,
    ),
    Contender(
        "spam",
        lambda base, hyper: base.tail(spam(base.b1, base.b2, base.eps)),
        anchor=True,
    ),
)

REGISTRY: dict[str, Contender] = {c.name: c for c in _ENTRIES}


def contender(name: str) -> Contender:
    """The registry entry called ``name``, with the known names in the error."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no contender {name!r}; the registry has {sorted(REGISTRY)}") from None


def split_names(text: str) -> list[str]:
    """Registry names from a comma-separated flag; commas inside parentheses stay.

    ``"spike_guard,alrc(both) + log_dampen(auto)"`` is two names, not three.
    """
    names, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            names.append(text[start:i])
            start = i + 1
    names.append(text[start:])
    return [name.strip() for name in names if name.strip()]


def build(name: str, base: Base, hyper: Any = 0.0) -> optax.GradientTransformationExtraArgs:
    """The optimizer of contender ``name`` on ``base``, taking ``value`` like the others."""
    return optax.with_extra_args_support(contender(name).make(base, hyper))

"""Step-overhead benchmark: what each transform costs per optimizer step, against Adam.

For each model size, every contender runs the same jitted step, ``opt.update`` then
``optax.apply_updates``, with the parameters and the optimizer state donated (updated
in place, as in a real training loop), on the same pytree of several leaves (an MLP:
three dense layers, their biases and a layer-norm scale) and the same gradients.
Each step is compiled ahead of time (compile time reported), warmed up, then timed
with ``jax.block_until_ready``. The contenders are interleaved round-robin in one
process, in a rotating order, so that machine noise hits all of them alike; the table
gives the median ms/step and its ratio to ``optax.adam``: to the faster of the two
identical Adam runners (``base`` and ``base (control)``), since on a shared machine
two runners of the same step can differ by 10-25 % (buffer placement), and the faster
one is the conservative reference for an overhead. ``paired`` is steadier against
drifting load: the median over rounds of the contender's time in that round divided by
the faster Adam runner's time in the same round.

Contenders, by their names in ``contenders.py`` (each in front of Adam): ``base`` and
``base (control)``, the Adam step twice, whose ratios show the noise floor of the run;
``log_dampen`` (that is ``logadam``); ``alrc``; ``alrc + log_dampen``; per-example ALRC
(``alrc_per_example``, fed a vector of per-example losses); ``alrc(grad_norm)``;
``log_dampen(auto)`` (``logadam(dampen_scale="auto")``); ``spike_guard``; ``tuned clip``
(``clip_by_global_norm(1.0)``, the reference for ``spike_guard``).
``naive log1p`` is a reference row: the
straightforward ``sign(g) * log1p(|g|)`` as an ``optax.stateless`` transform before
Adam, the formulation this package's ``log_dampen`` replaces.

Also reported: the optimizer-state bytes (and the extra bytes over Adam) and the
achieved bandwidth against the bytes a fused step must move at least: g, m, v and p
read and m, v and p written once, ``7 * 4 * N`` bytes for float32 (the roofline on a
GPU). On a GPU the step runs there (code path not yet run on one).

``--cpu-vector-width 512`` compiles every step, the Adam references included, with the
per-computation XLA option ``xla_cpu_prefer_vector_width=512`` (what a user gets from
``jax.jit(step, compiler_options={"xla_cpu_prefer_vector_width": 512})``): XLA's CPU
backend otherwise asks LLVM for 256-bit vectors even on AVX-512 machines, which halves
the throughput of the dampening arithmetic there.

Layouts (``--layouts``): ``grid``, 300 tensors of (64, 64) (``--grid``), where compile
time dominates; ``transformer``, a 12-layer GPT's unscanned tensors at each size;
``scanned``, the same GPT with its layers stacked (12 tensors, as a scanned model keeps
them); ``mlp``, the blocks above. Every table gives the compile time next to the step time.

Usage::

  python benchmarks/step_overhead.py                      # grid, transformer at 10M
  python benchmarks/step_overhead.py --full               # and 1M, 50M transformers
  python benchmarks/step_overhead.py --layouts mlp --sizes 1e6,1e7,5e7
  python benchmarks/step_overhead.py --sizes 1e6,1e7 --steps 50
  python benchmarks/step_overhead.py --quick              # 1M only, a few seconds
  python benchmarks/step_overhead.py --cpu-vector-width 512   # AVX-512 CPUs
  python benchmarks/step_overhead.py --layouts mlp --sizes 1e6 --blocks 30  # 210 tensors
  python benchmarks/step_overhead.py --per-tensor   # and each with grouping off, beside it

On a single CPU device the dampening kernel is traced once per group of up to 16 small
tensors of one shape (``optax_logdamp._grouping``); ``--per-tensor`` races each dampening
contender again with one kernel per tensor, as before that, so both compile times come
from one run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_logdamp._grouping as grouping

from contenders import Base, build, contender, split_names
from reporting import machine_line

LEARNING_RATE = 1e-3
NUM_EXAMPLES = 256  # length of the per-example loss vector
ROOFLINE_ARRAYS = 7  # g, m, v, p read; m, v, p written


class Contender(NamedTuple):
    """One optimizer in the race: its transform and the kind of ``value`` it takes."""

    name: str
    tx: optax.GradientTransformationExtraArgs
    value: str  # "none", "scalar" (batch loss) or "vector" (per-example losses)
    grouped: bool | None = None  # the kernel per group of small tensors (None: the default)


def naive_log_dampen() -> optax.GradientTransformation:
    """The straightforward ``sign(g) * log1p(|g|)``, as a reference row."""
    return optax.stateless(lambda updates, params: jax.tree.map(_naive_leaf, updates))


def _naive_leaf(g: jax.Array) -> jax.Array:
    return jnp.sign(g) * jnp.log1p(jnp.abs(g))


# The registry names (``contenders.py``) raced here, with plain Adam as the base; every one
# is given the scalar loss as ``value`` (per-example ALRC: a vector), which the
# transforms that do not read it ignore. Two rows are measurements, not contenders:
# ``base (control)``, the same Adam step again, and ``naive log1p``.
RACED = (
    "log_dampen",
    "alrc",
    "alrc + log_dampen",
    "alrc_per_example",
    "alrc(grad_norm)",
    "log_dampen(auto)",
    "spike_guard",
    "tuned clip",  # clip_by_global_norm(1.0): the cost does not depend on the threshold
)
MEASUREMENTS = ("base (control)", "naive log1p")


def per_tensor(rows: Sequence[Contender]) -> list[Contender]:
    """Each dampening contender again with one kernel per tensor (grouping off)."""
    return [
        Contender(f"{c.name} (per tensor)", c.tx, c.value, grouped=False)
        for c in rows
        if "log_dampen" in c.name or "spike_guard" in c.name
    ]


def contenders() -> list[Contender]:
    """The transforms compared; the two Adam runners first (the reference)."""
    base = Base(LEARNING_RATE)
    rows = [
        Contender("base", build("base", base), "scalar"),
        Contender("base (control)", build("base", base), "scalar"),
    ]
    for name in RACED:
        kind = "vector" if contender(name).per_example else "scalar"
        rows.append(Contender(name, build(name, base, hyper=1.0), kind))
    naive = optax.chain(naive_log_dampen(), optax.adam(LEARNING_RATE))
    rows.append(Contender("naive log1p", optax.with_extra_args_support(naive), "scalar"))
    return rows


def make_params(num_params: int, blocks: int = 1) -> dict[str, jax.Array]:
    """An MLP-shaped pytree with about ``num_params`` float32 parameters.

    Each block is layers ``d -> 4d -> d -> d`` with biases and a layer-norm scale, seven
    tensors of ``9 d**2 + 7 d`` parameters in all.

    Args:
      num_params: the target number of parameters.
      blocks: how many such blocks (``7 * blocks`` tensors); more blocks of a smaller
        ``d`` keep the size and multiply the tensors, as in a deep model.

    Returns:
      A dict of zero-initialised float32 arrays.
    """
    d = max(1, int(math.sqrt(num_params / (9 * blocks))))
    shapes = {
        "dense1/kernel": (d, 4 * d),
        "dense1/bias": (4 * d,),
        "dense2/kernel": (4 * d, d),
        "dense2/bias": (d,),
        "dense3/kernel": (d, d),
        "dense3/bias": (d,),
        "norm/scale": (d,),
    }
    if blocks > 1:
        shapes = {f"block{b}/{name}": s for b in range(blocks) for name, s in shapes.items()}
    return {name: jnp.zeros(shape, jnp.float32) for name, shape in shapes.items()}


def make_grid_params(tensors: int = 300) -> dict[str, jax.Array]:
    """``tensors`` float32 tensors of shape (64, 64): compile time against tensor count."""
    return {f"t{i:03d}": jnp.zeros((64, 64), jnp.float32) for i in range(tensors)}


def make_transformer_params(
    num_params: int, layers: int = 12, scanned: bool = False
) -> dict[str, jax.Array]:
    """The tensors of a ``layers``-layer GPT with about ``num_params`` parameters.

    Per layer: ln1 scale and bias, qkv ``(d, 3d)``, proj ``(d, d)``, ln2 scale and bias,
    fc ``(d, 4d)``, out ``(4d, d)``; then a ``(2048, d)`` embedding, ``(512, d)``
    positions and ln_f scale and bias: ``8 layers + 4`` tensors, ``d`` from the size.
    ``scanned``: each per-layer tensor stacked over the layers (``(layers, d, 3d)``...),
    as ``nnx.scan``, Flax's ``nn.scan`` or Levanter's ``Stacked`` keep them: 12 tensors.
    """
    vocab, context = 2048, 512
    a, b = 12 * layers, vocab + context + 4 * layers + 2  # num_params = a d**2 + b d
    d = max(1, int((-b + math.sqrt(b * b + 4 * a * num_params)) / (2 * a)))
    shapes = {"embed": (vocab, d), "positions": (context, d), "ln_f/scale": (d,), "ln_f/bias": (d,)}
    for layer in range(layers):
        for name, shape in [
            ("ln1/scale", (d,)),
            ("ln1/bias", (d,)),
            ("qkv", (d, 3 * d)),
            ("proj", (d, d)),
            ("ln2/scale", (d,)),
            ("ln2/bias", (d,)),
            ("fc", (d, 4 * d)),
            ("out", (4 * d, d)),
        ]:
            if scanned:
                shapes[f"layers/{name}"] = (layers, *shape)
            else:
                shapes[f"layer{layer:02d}/{name}"] = shape
    return {name: jnp.zeros(shape, jnp.float32) for name, shape in shapes.items()}


def make_layout(layout: str, num_params: int, blocks: int, grid: int) -> dict[str, jax.Array]:
    """A layout's parameters: ``mlp`` (``--blocks``), ``grid``, ``transformer``, ``scanned``."""
    if layout == "grid":
        return make_grid_params(grid)
    if layout in ("transformer", "scanned"):
        return make_transformer_params(num_params, scanned=layout == "scanned")
    return make_params(num_params, blocks)


def make_grads(params: dict[str, jax.Array], seed: int = 0) -> dict[str, jax.Array]:
    """Gaussian gradients with a heavy tail (one element in 1000 is 1000x larger)."""
    keys = jax.random.split(jax.random.key(seed), len(params))
    grads = {}
    for key, (name, p) in zip(keys, params.items(), strict=True):
        k1, k2 = jax.random.split(key)
        spikes = jnp.where(jax.random.uniform(k2, p.shape) < 1e-3, 1e3, 1.0)
        grads[name] = 1e-3 * jax.random.normal(k1, p.shape) * spikes
    return grads


def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays in a pytree."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def make_value(kind: str) -> jax.Array | None:
    """The ``value`` extra argument: none, a scalar loss or per-example losses."""
    if kind == "none":
        return None
    if kind == "scalar":
        return jnp.float32(1.0)
    return jnp.linspace(0.5, 1.5, NUM_EXAMPLES, dtype=jnp.float32)


def make_step(tx: optax.GradientTransformationExtraArgs) -> Callable:
    """The jitted step, parameters and state donated."""

    def step(params, opt_state, grads, value):
        kwargs = {} if value is None else {"value": value}
        updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


class Runner:
    """One contender at one size: compiled step, live buffers, timings."""

    def __init__(self, contender: Contender, params, grads, compiler_options=None):
        self.name = contender.name
        self.params = jax.tree.map(jnp.copy, params)
        self.state = contender.tx.init(self.params)
        self.state_bytes = tree_bytes(self.state)
        self.grads = grads
        self.value = make_value(contender.value)
        # --per-tensor: the same transform traced with grouping off (for this trace only).
        grouped = grouping.enabled() if contender.grouped is None else contender.grouped
        with mock.patch.object(grouping, "enabled", lambda: grouped):
            start = time.perf_counter()
            lowered = make_step(contender.tx).lower(self.params, self.state, grads, self.value)
            self.compiled = lowered.compile(compiler_options)
            self.compile_s = time.perf_counter() - start
        self.times: list[float] = []

    def run(self, record: bool) -> None:
        """One step; its wall time is recorded if ``record``."""
        start = time.perf_counter()
        self.params, self.state = self.compiled(self.params, self.state, self.grads, self.value)
        jax.block_until_ready((self.params, self.state))
        if record:
            self.times.append(time.perf_counter() - start)

    def release(self) -> None:
        self.params = self.state = self.compiled = None


def race(runners: Sequence[Runner], steps: int, warmup: int) -> None:
    """Interleaves the runners round-robin; the order rotates every round."""
    for round_index in range(warmup + steps):
        shift = round_index % len(runners)
        for runner in list(runners[shift:]) + list(runners[:shift]):
            runner.run(record=round_index >= warmup)


def benchmark_size(
    num_params: int,
    steps: int,
    warmup: int,
    names: Sequence[str] | None,
    compiler_options: dict[str, Any] | None = None,
    blocks: int = 1,
    layout: str = "mlp",
    grid: int = 300,
    compare_per_tensor: bool = False,
):
    """Runs every contender at one size; returns (parameter count, tensor count, rows)."""
    params = make_layout(layout, num_params, blocks, grid)
    grads = make_grads(params)
    chosen = [
        c for c in contenders() if names is None or c.name in names or c.name.startswith("base")
    ]
    if compare_per_tensor:
        chosen += per_tensor(chosen)
    runners = [Runner(c, params, grads, compiler_options) for c in chosen]
    race(runners, steps, warmup)
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    adam = runners[0]
    adams = [r for r in runners if r.name.startswith("base")]
    adam_ms = min(statistics.median(r.times) for r in adams) * 1e3
    adam_per_round = [min(times) for times in zip(*(r.times for r in adams), strict=True)]
    rows = []
    for runner in runners:
        ms = statistics.median(runner.times) * 1e3
        moved = ROOFLINE_ARRAYS * tree_bytes(params)
        rows.append(
            {
                "name": runner.name,
                "ms": ms,
                "ratio": ms / adam_ms,
                "paired": statistics.median(
                    t / a for t, a in zip(runner.times, adam_per_round, strict=True)
                ),
                "min_ms": min(runner.times) * 1e3,
                "compile_s": runner.compile_s,
                "state_bytes": runner.state_bytes,
                "extra_bytes": runner.state_bytes - adam.state_bytes,
                "gbps": moved / (ms * 1e-3) / 1e9,
            }
        )
        runner.release()
    return n, len(params), rows


def format_table(n: int, rows: Sequence[dict], steps: int, tensors: int, layout: str) -> str:
    """A markdown table for one size."""
    lines = [
        f"\n### {layout}: {n / 1e6:.2f}M parameters in {tensors} tensors "
        f"({steps} timed steps, median)\n",
        "| contender | ms/step | x adam | paired | min ms | compile s | state bytes "
        "| extra bytes | GB/s vs 28N B |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['ms']:.3f} | {r['ratio']:.3f} | {r['paired']:.3f} "
            f"| {r['min_ms']:.3f} "
            f"| {r['compile_s']:.2f} | {r['state_bytes']:,} | {r['extra_bytes']:,} "
            f"| {r['gbps']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1e7", help="comma-separated param counts")
    parser.add_argument(
        "--layouts",
        default="grid,transformer",
        help="comma-separated: grid (--grid tensors of (64, 64), whatever the size), "
        "transformer (12 layers, unscanned), scanned (the same, layers stacked), "
        "mlp (--blocks blocks of 7 tensors)",
    )
    parser.add_argument("--grid", type=int, default=300, help="tensors of the grid layout")
    parser.add_argument("--full", action="store_true", help="sizes 1M, 10M and 50M")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per contender")
    parser.add_argument("--only", default=None, help="comma-separated contenders (+ adams)")
    parser.add_argument("--quick", action="store_true", help="1M params, 20 steps")
    parser.add_argument(
        "--blocks",
        type=int,
        default=1,
        help="MLP blocks of 7 tensors each, same total size (default 1): compile time "
        "grows with the number of tensors",
    )
    parser.add_argument(
        "--per-tensor",
        action="store_true",
        help="also race each dampening contender with one kernel per tensor (the grouping "
        "of small same-shape tensors off, as before it), rows '... (per tensor)'",
    )
    parser.add_argument(
        "--cpu-vector-width",
        type=int,
        choices=(128, 256, 512),
        default=None,
        help="compile every step with xla_cpu_prefer_vector_width (default: XLA's, 256)",
    )
    args = parser.parse_args(argv)
    if args.blocks < 1:
        parser.error(f"--blocks must be at least 1, got {args.blocks}")
    args.layouts = args.layouts.split(",")
    unknown = set(args.layouts) - {"grid", "transformer", "scanned", "mlp"}
    if unknown:
        choices = "grid, transformer, scanned, mlp"
        parser.error(f"--layouts: unknown {sorted(unknown)}; choose {choices}")
    if args.full:
        args.sizes = "1e6,1e7,5e7"
    if args.quick:
        args.sizes, args.steps, args.warmup, args.layouts = "1e6", 20, 3, ["mlp"]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the benchmark and prints one table per size."""
    args = parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    names = None if args.only is None else split_names(args.only)
    print("# Step overhead: jitted update + apply_updates, donated params and state")
    print(machine_line())
    compiler_options = None
    if args.cpu_vector_width is not None:
        compiler_options = {"xla_cpu_prefer_vector_width": args.cpu_vector_width}
        print(f"compiler_options={compiler_options} (every step, Adam included)")
    if jax.default_backend() != "cpu":
        print("(accelerator path: written for GPU, not yet run on one)")
    for layout in args.layouts:
        for size in sizes[:1] if layout == "grid" else sizes:  # the grid has one size
            n, tensors, rows = benchmark_size(
                size,
                args.steps,
                args.warmup,
                names,
                compiler_options,
                args.blocks,
                layout,
                args.grid,
                args.per_tensor,
            )
            print(format_table(n, rows, args.steps, tensors, layout), flush=True)


if __name__ == "__main__":
    main()

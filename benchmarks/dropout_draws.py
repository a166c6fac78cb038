"""What a dropout mask's random draws cost (issue 19; benchmarks/RESULTS.md, "The train step
against PyTorch eager"): inverted dropout of one [64, 100, 512] activation (the demo text tower's
GELU output at batch 64, 100 tokens) drawn by flax's `nn.Dropout` (`jax.random`'s threefry,
the text tower's `model.txt.dropout_draw='flax'`), by retina_jax's packed draw (four 16-bit
uniforms per threefry evaluation, the default `'packed'`; retina_jax/models/dropout.py), by XLA's
RngBitGenerator with the threefry algorithm and by XLA's default algorithm (Philox on CPU, what
JAX's 'rbg' keys use). Each is jitted once, then timed alternately, median of `--repeats`. The
RngBitGenerator draws are not used in training: a 2-process run's masks differed from a 1-process
run's (RESULTS).

    python benchmarks/dropout_draws.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from retina_jax.models.dropout import Dropout


def xla_dropout(rng, x, rate, algorithm):
    """Inverted dropout keeping an element when its 32-bit RngBitGenerator word >= rate x 2^32."""
    key = jnp.tile(jax.random.key_data(rng).astype(jnp.uint32), 2)
    _, words = jax.lax.rng_bit_generator(key, x.shape, jnp.uint32, algorithm=algorithm)
    keep = words >= jnp.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))
    return jax.lax.select(keep, x / (1 - rate), jnp.zeros_like(x))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--rate", type=float, default=0.1)
    args = parser.parse_args(argv)
    x = jnp.ones((64, 100, 512))
    apply = lambda layer: lambda rng, x: layer.apply({}, x, deterministic=False, rngs={"dropout": rng})  # noqa: E731
    ways = {"flax nn.Dropout (jax.random threefry)": apply(nn.Dropout(args.rate)),
            "retina_jax packed (4 per threefry call)": apply(Dropout(args.rate, draw="packed")),
            "XLA RngBitGenerator, threefry": lambda rng, x: xla_dropout(
                rng, x, args.rate, jax.lax.RandomAlgorithm.RNG_THREE_FRY),
            "XLA RngBitGenerator, default (Philox)": lambda rng, x: xla_dropout(
                rng, x, args.rate, jax.lax.RandomAlgorithm.RNG_DEFAULT)}
    ways = {name: jax.jit(f) for name, f in ways.items()}
    times = {name: [] for name in ways}
    for i in range(args.repeats + 1):
        for name, f in ways.items():
            rng = jax.random.key(i)
            began = time.perf_counter()
            jax.block_until_ready(f(rng, x))
            if i:  # the first call compiles
                times[name].append(time.perf_counter() - began)
    base = statistics.median(times[next(iter(ways))])
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:40s} {m * 1e3:7.2f} ms for {x.size:,} elements ({m / x.size * 1e9:.2f} ns each, "
              f"x{base / m:.2f} of flax's speed), {jax.device_count()} device(s) on {jax.devices()[0].platform}")


if __name__ == "__main__":
    main()

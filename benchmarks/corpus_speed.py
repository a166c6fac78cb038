"""Synthetic corpus generation speed: images per second per core (single process, one thread).

    python benchmarks/corpus_speed.py [--n 200] [--sizes 224 512] [--seed 0] [--modalities CFP FFA OCT]

Renders examples of the default corpus (all conditions, default attribute/comorbidity rates) in one
process and reports images/sec/core and ms/image for each size (and each modality: a corpus of that
modality alone), plus the cost of `record()` alone.
"""
import argparse
import os
import platform
import time

for _v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_v, '1')

from retina_jax.data.synthetic import MODALITIES, CorpusSpec, SyntheticFundus  # noqa: E402


def bench(size: int, n: int, seed: int, modality: str = 'CFP') -> tuple[float, float]:
    ds = SyntheticFundus(CorpusSpec(seed=seed, size=n + 10, image_size=size, modalities=(modality,)))
    for i in range(n, n + 10):      # warm-up (grid caches)
        ds[i]
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    dt = time.perf_counter() - t0
    return n / dt, 1000 * dt / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=200)
    ap.add_argument('--sizes', type=int, nargs='+', default=[224, 512])
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--modalities', nargs='+', default=['CFP'], choices=MODALITIES)
    args = ap.parse_args()
    print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible; single process')
    for s in args.sizes:
        for m in args.modalities:
            ips, ms = bench(s, args.n, args.seed, m)
            tag = '' if args.modalities == ['CFP'] else f' {m}'
            print(f'image_size={s:4d}{tag}: {ips:8.1f} images/sec/core  ({ms:.2f} ms/image, n={args.n})')
    ds = SyntheticFundus(CorpusSpec(seed=args.seed, size=2000))
    t0 = time.perf_counter()
    for i in range(2000):
        ds.record(i)
    print(f'record() only: {2000 / (time.perf_counter() - t0):8.1f} records/sec/core')


if __name__ == '__main__':
    main()

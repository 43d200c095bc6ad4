"""Sampling throughput of the refine stage: samples/s and NFE for K ladder steps.

    python benchmarks/bench_refine.py                                  # DDPM CIFAR-10 net, K = 10, 20, 50
    python benchmarks/bench_refine.py --preset default --steps 10,20,50
    python benchmarks/bench_refine.py --device cuda --precision bf16 --batch 512

Times `dkgm.sampler.debias` with a randomly initialised network of the preset's shape (the
speed does not depend on the weights) and per-sample noise streams, as the stage runs it.
Needs only torch and numpy (dkgm), so it runs on a GPU machine as a plain script.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkgm.debias import Denoiser  # noqa: E402
from dkgm.devices import resolve_device  # noqa: E402
from dkgm.networks import build_network  # noqa: E402
from dkgm.rng import randn_per_sample, sample_generators  # noqa: E402
from dkgm.sampler import debias, make_ladder  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import PRESETS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="ddpm-cifar10")
    p.add_argument("--steps", default="10,20,50")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    p.add_argument("--solver", choices=["euler", "heun"], default="euler")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args()
    dev = resolve_device(args.device)
    batch = args.batch or (256 if dev.type == "cuda" else 16)
    cfg = PRESETS[args.preset]
    torch.manual_seed(0)
    den = Denoiser(build_network(cfg), 0.5).to(dev).eval()
    if dev.type == "cuda":
        den = den.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    x0 = torch.randn(batch, *cfg.shape, device=dev) * 0.6
    seeds = list(range(batch))

    def fn(x, s):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            return den(x, s)

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"preset={args.preset} device={name} precision={args.precision} solver={args.solver} eta={args.eta} "
          f"batch={batch} torch={torch.__version__}")
    print(f"{'K':>4s} {'NFE':>5s} {'seconds':>9s} {'samples/s':>10s} {'evals/s':>9s}")
    with torch.inference_mode():
        for k in [int(s) for s in args.steps.split(",")]:
            ladder = make_ladder(0.3, k, "geometric", args.eta)
            gens = sample_generators(seeds, "refine")
            noise = lambda step, shape: randn_per_sample(gens, shape[1:]).to(dev)  # noqa: E731
            debias(fn, x0, make_ladder(0.3, 1, "geometric", args.eta), solver=args.solver, noise=noise)  # warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            debias(fn, x0, ladder, solver=args.solver, noise=noise)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            nfe = ladder.nfe(args.solver)
            print(f"{k:4d} {nfe:5d} {dt:9.2f} {batch / dt:10.2f} {batch * nfe / dt:9.1f}")


if __name__ == "__main__":
    main()

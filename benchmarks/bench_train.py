"""Training throughput of the debiaser: images/s and achieved TFLOP/s against the matmul ceiling.

    python benchmarks/bench_train.py                     # DDPM CIFAR-10 net (35.7M), batch 128
    python benchmarks/bench_train.py --preset default    # the params.yaml default (MNIST 32x32)
    python benchmarks/bench_train.py --device cuda --precision bf16 --compile

FLOPs of one training step (forward + backward) are counted with torch's FlopCounterMode; the
ceiling is a large square matmul in the same precision, measured in the same run. Needs only
torch and numpy (dkgm), so it runs on a GPU machine as a plain script.
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
from dkgm.networks import NetworkConfig, build_network, count_parameters  # noqa: E402
from dkgm.training import TrainConfig, train  # noqa: E402

PRESETS = {
    "ddpm-cifar10": NetworkConfig(arch="unet", channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2,
                                  attn_resolutions=(16,), dropout=0.1, shape=(3, 32, 32)),
    "default": NetworkConfig(arch="unet", channels=32, channel_mult=(1, 2, 2), num_blocks=1,
                             attn_resolutions=(8,), shape=(1, 32, 32)),
}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def step_flops(den: Denoiser, batch: int, shape, dev: torch.device, precision: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from dkgm.debias import denoising_loss

    x = torch.randn(batch, *shape, device=dev)
    sigma = torch.full((batch,), 0.5, device=dev)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = denoising_loss(den, x, sigma, torch.randn_like(x)).mean()
        loss.backward()
    den.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def matmul_ceiling(dev: torch.device, precision: str) -> float:
    n = 8192 if dev.type == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    reps = 20 if dev.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="ddpm-cifar10")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 on CUDA, 3 on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    dev = resolve_device(args.device)
    precision = args.precision or ("bf16" if dev.type == "cuda" else "fp32")
    steps = args.steps or (30 if dev.type == "cuda" else 3)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg = PRESETS[args.preset]
    torch.manual_seed(0)
    den = Denoiser(build_network(cfg), 0.5).to(dev)
    flops = step_flops(den, args.batch, cfg.shape, dev, precision)
    data = torch.rand(2048, *cfg.shape) * 2 - 1
    warm = 3 if dev.type == "cuda" else 1
    tcfg = TrainConfig(batch_size=args.batch, total_kimg=(warm + steps) * args.batch / 1000, precision=precision,
                       channels_last=dev.type == "cuda", compile=args.compile, log_every=10**9, warmup_kimg=0)
    # warm-up run (compilation, cudnn autotuning), then the timed run from the same start
    train(Denoiser(build_network(cfg), 0.5), data, TrainConfig(**{**tcfg.__dict__, "total_kimg": warm * args.batch / 1000}), device=dev)
    sync(dev)
    t0 = time.perf_counter()
    train(den, data, TrainConfig(**{**tcfg.__dict__, "total_kimg": steps * args.batch / 1000}), device=dev)
    sync(dev)
    dt = time.perf_counter() - t0
    ceiling = matmul_ceiling(dev, precision)
    achieved = flops * steps / dt
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"preset={args.preset} params={count_parameters(den) / 1e6:.2f}M device={name} precision={precision} "
          f"compile={args.compile} batch={args.batch} steps={steps} torch={torch.__version__}")
    print(f"{'images/s':>10s} {'step ms':>9s} {'GFLOP/step':>11s} {'TFLOP/s':>9s} {'matmul TFLOP/s':>15s} {'fraction':>9s}")
    print(f"{steps * args.batch / dt:10.1f} {1000 * dt / steps:9.1f} {flops / 1e9:11.1f} {achieved / 1e12:9.3f} "
          f"{ceiling / 1e12:15.3f} {achieved / ceiling:9.1%}")


if __name__ == "__main__":
    main()

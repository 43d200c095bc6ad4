"""Training throughput of the debiaser: images/s and achieved TFLOP/s against the matmul ceiling,
and the same training step timed on diffusers' UNet2DModel in DDPM's CIFAR-10 configuration.

    python benchmarks/bench_train.py                     # DDPM CIFAR-10 net (35.7M), batch 128, then the peer table
    python benchmarks/bench_train.py --preset default    # the params.yaml default (MNIST 32x32)
    python benchmarks/bench_train.py --preset default --batch 32 --channels 32 --no-peer   # another width
    python benchmarks/bench_train.py --device cuda --precision bf16 --compile
    python benchmarks/bench_train.py --peer-only --batch 16 --steps 5 --warmup 3 --out benchmarks/results/train_peer_cpu.md

Two measurements:

- **the trainer** (dkgm.training.train, as train_debiaser runs it: EMA, clipping, loss statistics).
  FLOPs of one training step (forward + backward) are counted with torch's FlopCounterMode (matmuls,
  convolutions and attention; elementwise ops and norms are not counted); the ceiling is a large
  square matmul in the same precision, measured in the same run.
- **the peer table** (skipped with --no-peer, or with one line when diffusers is not importable):
  our U-Net and diffusers' UNet2DModel, both in DDPM's CIFAR-10 configuration and built from the
  config (no weights), timed with one identical bare step at the same batch and precision: random
  x0 and noise drawn on the device, an MSE denoising loss (ours: the EDM-preconditioned loss of
  dkgm.debias; diffusers: epsilon prediction at a DDPM timestep), backward, AdamW. Rounds alternate
  between the two networks and each network's best round is reported, so a noisy shared machine
  penalises both alike.

Needs only torch and numpy (dkgm); diffusers only for the peer row, so it runs on a GPU machine
as a plain script.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkgm.debias import Denoiser, denoising_loss  # noqa: E402
from dkgm.devices import resolve_device, resolve_precision  # noqa: E402
from dkgm.networks import NetworkConfig, build_network, count_parameters  # noqa: E402
from dkgm.training import TrainConfig, train  # noqa: E402

PRESETS = {
    "ddpm-cifar10": NetworkConfig(arch="unet", channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2,
                                  attn_resolutions=(16,), dropout=0.1, shape=(3, 32, 32)),
    "default": NetworkConfig(arch="unet", channels=24, channel_mult=(1, 2, 2), num_blocks=1,
                             attn_resolutions=(8,), shape=(1, 32, 32)),
}

# diffusers' UNet2DModel as google/ddpm-cifar10-32 configures it: widths 128-256-256-256, two
# residual blocks per level, self-attention at 16 x 16 only (the second level down, the third up),
# single-head attention (attention_head_dim None), TF-style asymmetric downsampling padding.
DIFFUSERS_DDPM_CIFAR10 = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": None, "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6,
    "dropout": 0.1,
}
DDPM_STEPS = 1000  # DDPM's linear beta schedule 1e-4 .. 0.02 over 1000 steps


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def step_flops(den: Denoiser, batch: int, shape, dev: torch.device, precision: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

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


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- the trainer


def bench_trainer(args: argparse.Namespace, dev: torch.device, precision: str) -> None:
    steps = args.steps or (30 if dev.type == "cuda" else 3)
    cfg = PRESETS[args.preset]
    if args.channels:
        cfg = dataclasses.replace(cfg, channels=args.channels)
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
    print(f"preset={args.preset} channels={cfg.channels} params={count_parameters(den) / 1e6:.2f}M device={device_name(dev)} precision={precision} "
          f"compile={args.compile} batch={args.batch} steps={steps} torch={torch.__version__}")
    print(f"{'images/s':>10s} {'step ms':>9s} {'GFLOP/step':>11s} {'TFLOP/s':>9s} {'matmul TFLOP/s':>15s} {'fraction':>9s}")
    print(f"{steps * args.batch / dt:10.1f} {1000 * dt / steps:9.1f} {flops / 1e9:11.1f} {achieved / 1e12:9.3f} "
          f"{ceiling / 1e12:15.3f} {achieved / ceiling:9.1%}")


# ----------------------------------------------------------------------------- the peer table


class _OursStep:
    """Our DDPM CIFAR-10 U-Net inside the EDM preconditioning, with the project's loss."""

    name = "ours: dkgm.networks UNet (DDPM CIFAR-10 config)"

    def __init__(self, dev: torch.device):
        torch.manual_seed(0)
        self.net = Denoiser(build_network(PRESETS["ddpm-cifar10"]), 0.5)

    def loss(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        n = x0.shape[0]
        sigma = torch.exp(torch.empty(n, device=x0.device).uniform_(-6.2, 0.0))  # log-uniform in [0.002, 1]
        return denoising_loss(self.net, x0, sigma, noise).mean()

    def forward_only(self, x0: torch.Tensor) -> torch.Tensor:
        return self.net(x0, torch.full((x0.shape[0],), 0.5, device=x0.device))


class _DiffusersStep:
    """diffusers' UNet2DModel predicting the noise of a DDPM forward process (its usual training loss)."""

    name = "diffusers UNet2DModel (DDPM CIFAR-10 config)"

    def __init__(self, dev: torch.device):
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        self.net = UNet2DModel(**DIFFUSERS_DDPM_CIFAR10)
        betas = torch.linspace(1e-4, 0.02, DDPM_STEPS, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1 - betas, 0).float().to(dev)

    def loss(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, DDPM_STEPS, (x0.shape[0],), device=x0.device)
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = self.net(xt, t, return_dict=False)[0]
        return F.mse_loss(pred.float(), noise)

    def forward_only(self, x0: torch.Tensor) -> torch.Tensor:
        return self.net(x0, torch.full((x0.shape[0],), 500, device=x0.device), return_dict=False)[0]


def attention_resolutions(model: torch.nn.Module, x: torch.Tensor, call) -> list[int]:
    """Feature-map sizes at which the model runs scaled_dot_product_attention (to check a config)."""
    seen: list[int] = []
    orig = F.scaled_dot_product_attention

    def spy(q, *a, **kw):
        seen.append(round(q.shape[-2] ** 0.5))
        return orig(q, *a, **kw)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            call(x)
    finally:
        F.scaled_dot_product_attention = orig
    return sorted(set(seen))


def forward_flops(step, batch: int, dev: torch.device, precision: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, 3, 32, 32, device=dev)
    with (FlopCounterMode(display=False) as counter, torch.no_grad(),
          torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")):
        step.forward_only(x)
    return float(counter.get_total_flops())


def time_steps(step, opt, batch: int, n: int, dev: torch.device, precision: str, channels_last: bool, fn) -> float:
    """Seconds for n training steps of `fn` (loss -> backward -> AdamW), synchronised at the end."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        x0 = (torch.rand(batch, 3, 32, 32, device=dev) * 2 - 1).contiguous(memory_format=fmt)
        noise = torch.randn_like(x0)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = fn(x0, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(dev)
    return time.perf_counter() - t0


def bench_peer(args: argparse.Namespace, dev: torch.device, precision: str) -> str:
    batch = args.peer_batch or args.batch
    steps = args.steps or (20 if dev.type == "cuda" else 5)
    warm = args.warmup if args.warmup is not None else (5 if dev.type == "cuda" else 3)
    channels_last = dev.type == "cuda"
    entries = [_OursStep(dev)]
    skip = None
    try:
        entries.append(_DiffusersStep(dev))
    except Exception as exc:  # noqa: BLE001 - diffusers absent (the GPU machine) or too old for this config
        skip = f"peer: skipped (diffusers UNet2DModel not available: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        print(skip, file=sys.stderr)

    for e in entries:
        e.net.to(dev).train()
        if channels_last:
            e.net.to(memory_format=torch.channels_last)
        e.params = count_parameters(e.net)
        e.attn = attention_resolutions(e.net, torch.randn(1, 3, 32, 32, device=dev), e.forward_only)
        e.fwd_flops = forward_flops(e, batch, dev, precision)
        e.opt = torch.optim.AdamW(e.net.parameters(), lr=1e-4)
        e.fn = torch.compile(e.loss) if args.compile else e.loss
        print(f"{e.name}: {e.params:,} parameters ({e.params / 1e6:.2f}M), attention at {e.attn}, "
              f"forward {e.fwd_flops / batch / 1e9:.2f} GFLOP/image", file=sys.stderr)
        time_steps(e, e.opt, batch, warm, dev, precision, channels_last, e.fn)  # warm-up (autotuning, compile)
        e.best = float("inf")
    for r in range(args.rounds):
        for e in entries:
            dt = time_steps(e, e.opt, batch, steps, dev, precision, channels_last, e.fn)
            e.best = min(e.best, dt)
            print(f"round {r + 1}/{args.rounds} {e.name}: {steps * batch / dt:.2f} images/s", file=sys.stderr)

    ours = entries[0]
    peer = entries[1] if len(entries) > 1 else None
    lines = ["| network | params | batch | precision | images/s | ms/step | forward GFLOP/image | attention at | ours / diffusers (images/s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        ips = steps * batch / e.best
        ratio = "—" if peer is None else (f"{(steps * batch / ours.best) / (steps * batch / peer.best):.2f}" if e is ours else "1.00")
        lines.append(f"| {e.name} | {e.params / 1e6:.2f}M | {batch} | {precision}{' + compile' if args.compile else ''} | "
                     f"{ips:.2f} | {1000 * e.best / steps:.0f} | {e.fwd_flops / batch / 1e9:.2f} | "
                     f"{', '.join(f'{a}x{a}' for a in e.attn)} | {ratio} |")
    if skip:
        lines.append("")
        lines.append(skip)
    head = (f"device={device_name(dev)} precision={precision} compile={args.compile} channels_last={channels_last} "
            f"batch={batch} warm-up={warm} timed steps={steps} x {args.rounds} rounds (best round) torch={torch.__version__}")
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="ddpm-cifar10", help="network of the trainer row")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--channels", type=int, default=None, help="the trainer row's base width (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: trainer 30 on CUDA, 3 on CPU; peer 20 / 5)")
    p.add_argument("--warmup", type=int, default=None, help="peer warm-up steps per network (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--rounds", type=int, default=2, help="peer: alternating timed rounds per network (best is kept)")
    p.add_argument("--peer-batch", type=int, default=None, help="peer table batch (default: --batch)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast where the device has bf16 units (CUDA, AVX512-BF16/AMX CPUs), else fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-peer", action="store_true", help="only the trainer row")
    p.add_argument("--peer-only", action="store_true", help="only the peer table")
    p.add_argument("--out", help="write the peer table (markdown, with the command) to this file")
    args = p.parse_args()
    dev = resolve_device(args.device)
    precision = resolve_precision(args.precision, dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    if not args.peer_only:
        bench_trainer(args, dev, precision)
    if args.no_peer:
        return
    table = bench_peer(args, dev, precision)
    print()
    print(table)
    if args.out:
        command = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:])
        text = "\n".join([
            "# Training step: our U-Net against diffusers' UNet2DModel (DDPM CIFAR-10 configuration)", "",
            f"Command: `{command}`", "",
            (f"Environment: python {platform.python_version()}, torch {torch.__version__}, {device_name(dev)}, "
             f"{platform.platform()}"), "",
            ("Both networks are built from their configs (no weights) and timed with one identical bare step: "
             "x0 and noise drawn on the device, an MSE denoising loss (ours: EDM-preconditioned; diffusers: "
             "epsilon prediction), backward, AdamW; no EMA, clipping or logging. Rounds alternate between the "
             "networks; each row is its best round."), "",
            table, "",
        ])
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

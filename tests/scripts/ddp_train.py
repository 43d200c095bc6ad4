"""Train a tiny swiss-roll debiaser under torchrun (or alone) and save its weights.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ddp_train.py OUT.pt
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dkgm.data import SwissRoll  # noqa: E402
from dkgm.debias import Denoiser  # noqa: E402
from dkgm.networks import NetworkConfig, build_network  # noqa: E402
from dkgm.training import TrainConfig, train  # noqa: E402

CFG = TrainConfig(batch_size=64, total_kimg=1.28, lr=2e-3, warmup_kimg=0.2, grad_clip=0.0, sigma_min=0.01,
                  sigma_max=0.1, log_every=5, ema_halflife_kimg=0.5, seed=3)


def run(out: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    pts, _ = SwissRoll().sample(2000, seed=0)
    den = Denoiser(build_network(NetworkConfig(arch="mlp", channels=32, num_blocks=2, shape=(2,))), 1.3)
    result = train(den, torch.from_numpy(pts), CFG)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        torch.save({"net": den.state_dict(), "ema": result.ema.state_dict()}, out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1])

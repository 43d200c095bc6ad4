"""The training recipe that both networks share: the `debiaser` section's model, the network and
trainer configurations built from it, resumable training states keyed by configuration, data and
training code, and `fit` (build, train or resume). Not a stage: stages/train_debiaser.py trains
DKGM's debiaser with it, stages/baseline.py the diffusion baseline's network over EDM's noise range.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

import dkgm
from dkgm.devices import init_distributed, resolve_precision
from dkgm.errors import DKGMError
from dkgm.figures import new_figure, save_figure
from stages.artifacts import Prepared
from stages.common import Progress, log, write_json
from stages.contract import Device, Section

if TYPE_CHECKING:
    import torch

    from dkgm.debias import Denoiser
    from dkgm.networks import NetworkConfig
    from dkgm.training import TrainConfig

STATES = "checkpoints/debiaser"  # resumable training states, outside DVC (one folder per config)

class DebiaserParams(Section):
    arch: Literal["unet", "dae", "mlp"] = Field(
        "unet",
        description="unet | dae (same net without skip connections: the ablation) | mlp (for swissroll)",
    )
    channels: int = Field(
        24, ge=1,
        description="base width (sweep: 24 channels at 60 kimg beat 32 at 40 kimg in about the same training time; "
                    "DDPM's CIFAR-10 net: 128)",
    )
    channel_mult: tuple[int, ...] = Field(
        (1, 2, 2),
        description="width multiplier per resolution (DDPM CIFAR-10: [1, 2, 2, 2])",
    )
    num_blocks: int = Field(1, ge=1, description="residual blocks per resolution (DDPM CIFAR-10: 2)")
    attn_resolutions: tuple[int, ...] = Field(
        (8,),
        description="feature-map sizes with self-attention (DDPM CIFAR-10: [16])",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout in the residual blocks (DDPM CIFAR-10: 0.1)")
    embedding: Literal["positional", "fourier"] = Field(
        "positional",
        description="noise-level embedding: positional | fourier",
    )
    sigma_min: float = Field(0.002, gt=0.0, description="smallest training noise level")
    sigma_max_margin: float = Field(
        1.5, ge=1.0,
        description="largest training noise level = margin x the largest calibrate.scales x h_kde (every "
                    "candidate start covered)",
    )
    sigma_dist: Literal["lognormal", "lognormal_truncated", "loguniform"] = Field(
        "lognormal",
        description="training noise levels on [sigma_min, sigma_max]: lognormal (EDM's, clipped to the range)"
                    " | lognormal_truncated | loguniform (the ablation)",
    )
    p_mean: float = Field(-1.2, description="log-normal: ln sigma ~ N(p_mean, p_std^2)")
    p_std: float = Field(1.2, gt=0.0, description="log-normal: its spread in ln sigma")
    batch_size: int = Field(
        32, ge=1,
        description="global batch, split across processes under torchrun (sweep: 32 beats 64 at equal kimg, "
                    "16 ties 32)",
    )
    total_kimg: float = Field(
        60.0, gt=0.0,
        description="thousands of images seen (~12 min alone at 24 channels on 2 AVX2 cores in fp32; bf16 where the "
                    "CPU has it)",
    )
    lr: float = Field(
        2e-3, gt=0.0,
        description="AdamW learning rate (sweep: 2e-3 >= 1e-3 at 40 kimg; benchmarks/results/sweep_recipe.md)",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW's decoupled weight decay")
    warmup_kimg: float = Field(2.0, ge=0.0, description="linear learning-rate warm-up")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="after the warm-up: constant | cosine (down to 0 at total_kimg; a longer total_kimg is "
                    "then a new run)",
    )
    adam_beta2: float = Field(0.99, gt=0.0, lt=1.0, description="AdamW's second-moment decay")
    grad_clip: float = Field(1.0, ge=0.0, description="max gradient norm (0 = off)")
    ema_halflife_kimg: float = Field(5.0, gt=0.0, description="EMA half-life; samples come from the EMA weights")
    ema_rampup_ratio: float | None = Field(
        0.05, gt=0.0,
        description="EMA half-life at most this fraction of the images seen (null = off)",
    )
    seed: int = Field(0, ge=0, description="initial weights, batch order and noise draws")
    log_every: int = Field(20, ge=1, description="steps per row of reports/train/log.parquet")
    state_every_kimg: float = Field(10.0, gt=0.0, description="resumable states in checkpoints/debiaser/<config hash>/")
    keep_states: int = Field(2, ge=1, description="newest states kept")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto (bf16 autocast on CUDA and bf16-capable CPUs) | fp32 | bf16",
    )
    compile: bool = Field(False, description="torch.compile the network")
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N")
    eval_images: int = Field(
        500, ge=1,
        description="held-out images for the denoising error (at sigma = h and at each calibrate scale)",
    )


def sigma_max_for(cfg: DebiaserParams, h: float, scales: tuple[float, ...]) -> float:
    """DKGM's largest training noise level: margin x the largest candidate start s x h_kde (DESIGN
    2.2), so the calibration grid and the network's range follow each other."""
    return cfg.sigma_max_margin * max(scales) * h


# the fields of the network and trainer configs that do not come from a section key of the same name
NETWORK_DERIVED = ("shape",)  # from the data
TRAINER_DERIVED = ("betas", "sigma_max", "precision", "channels_last", "sigma_buckets")  # sigma_buckets: the library's


def section_values(cfg: Section, config: type) -> dict[str, Any]:
    """The section's values of the dataclass `config`'s fields that the section declares under the
    same name (lists as tuples): a key is declared once, in the section, and reaches the library
    config by its name, never by a hand-kept copy."""
    names = {f.name for f in dataclasses.fields(config)} & set(type(cfg).model_fields)
    return {n: tuple(v) if isinstance(v := getattr(cfg, n), list) else v for n in sorted(names)}


def configs(cfg: DebiaserParams, h: float, shape: tuple[int, ...], device: torch.device, *,
            sigma_max: float, p_mean: float | None = None, p_std: float | None = None,
            sigma_dist: str | None = None) -> tuple[NetworkConfig, TrainConfig]:
    """The network and the trainer of a debiaser section over [sigma_min, sigma_max]. The noise
    distribution is the section's (sigma_dist, p_mean, p_std) unless given: the diffusion baseline
    trains the same network with the same trainer and optimizer over EDM's range and distribution."""
    from dkgm.networks import NetworkConfig
    from dkgm.training import TrainConfig

    net = NetworkConfig(**section_values(cfg, NetworkConfig), shape=tuple(shape))
    if cfg.sigma_min >= sigma_max:
        raise DKGMError(f"debiaser.sigma_min ({cfg.sigma_min}) must be below sigma_max = {sigma_max:.4g} "
                        "(debiaser.sigma_max_margin x the largest calibrate.scales x h_kde)")
    derived = {  # TRAINER_DERIVED, and the noise distribution the baseline replaces
        "betas": (0.9, cfg.adam_beta2),
        "sigma_max": sigma_max,
        "sigma_dist": sigma_dist or cfg.sigma_dist,
        "p_mean": cfg.p_mean if p_mean is None else p_mean,
        "p_std": cfg.p_std if p_std is None else p_std,
        "precision": resolve_precision(cfg.precision, device, "debiaser.precision"),
        "channels_last": device.type == "cuda" and len(shape) == 3,
    }
    train_cfg = TrainConfig(**{**section_values(cfg, TrainConfig), **derived})
    return net, train_cfg


# the keys that define the network, the trainer, the optimizer and the budget: the diffusion baseline reads
# these (stages/baseline.py), so both branches train the same network the same way; the noise range is DKGM's own
DKGM_ONLY_KEYS = ("sigma_max_margin", "sigma_dist", "p_mean", "p_std")  # DKGM's noise range; the baseline has EDM's
SHARED_KEYS = tuple(k for k in DebiaserParams.model_fields if k not in DKGM_ONLY_KEYS)

def states_root(root: Path) -> Path:
    """The folder training states live under: the project root, also when a stage runs in a DVC
    experiment's temporary workspace (`dvc exp run --queue` / `--temp`: <project>/.dvc/tmp/exps/...),
    which is a fresh copy without the untracked checkpoints/: states there would be lost with the
    workspace and every queued experiment would train from scratch. DKGM_STATES_ROOT overrides
    (a shared disk for several machines)."""
    if os.environ.get("DKGM_STATES_ROOT"):
        return Path(os.environ["DKGM_STATES_ROOT"]).expanduser()
    parts = Path(root).resolve().parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return Path(root)


TRAINING_CODE = ("networks.py", "debias.py", "training.py")  # the library files that define the network, loss and trainer
KEY_FILE = "key.json"  # in each state folder: what its states were made with (the hash's input, readable)


def training_code() -> str:
    """A hash of the source files that define the network, the loss and the trainer: a state made by
    other code is another model, never resumed as this one (other dkgm files, such as the metrics,
    leave finished states usable)."""
    src = Path(dkgm.__file__).parent
    digest = hashlib.sha256()
    for name in TRAINING_CODE:
        digest.update(name.encode() + b"\0" + (src / name).read_bytes())
    return digest.hexdigest()[:12]


def state_key(net: NetworkConfig, train_cfg: TrainConfig, data_key: dict[str, Any]) -> dict[str, Any]:
    return {"net": net.to_dict(), "train": train_cfg.trajectory_key(), "data": data_key, "code": training_code()}


def state_dir(root: Path, net: NetworkConfig, train_cfg: TrainConfig, data_key: dict[str, Any],
              states: str = STATES) -> Path:
    key = json.dumps(state_key(net, train_cfg, data_key), sort_keys=True)
    return states_root(root) / states / hashlib.sha256(key.encode()).hexdigest()[:16]


def other_code_states(where: Path, key: dict[str, Any]) -> list[Path]:
    """Sibling state folders made with the same configuration and data but other training code: states
    this run ignores (the caller says so in one line)."""
    found = []
    for sibling in sorted(where.parent.glob("*/" + KEY_FILE)) if where.parent.is_dir() else []:
        if sibling.parent == where:
            continue
        try:
            other = json.loads(sibling.read_text())
        except (OSError, ValueError):
            continue
        if other.get("code") != key["code"] and {k: v for k, v in other.items() if k != "code"} == {
                k: v for k, v in key.items() if k != "code"}:
            found.append(sibling.parent)
    return found


def code_version() -> str:
    """The dkgm version and a hash of the library's source files: what the snapshot's network
    code actually was. (A git revision would change the snapshot's bytes, and re-run everything
    downstream, on every commit, also ones that leave the model code alone.)"""
    src = Path(dkgm.__file__).parent
    digest = hashlib.sha256()
    for f in sorted(src.glob("*.py")):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return f"dkgm {dkgm.__version__} src {digest.hexdigest()[:12]}"


@dataclass
class Fitted:
    rank: int
    world: int
    device: torch.device
    net_cfg: NetworkConfig
    train_cfg: TrainConfig
    result: Any  # dkgm.training.TrainResult
    data: torch.Tensor
    sigma_data: float
    denoiser: Denoiser


def fit(cfg: DebiaserParams, prepared: Prepared, root: Path, *, h: float, data_extra: dict[str, Any], label: str,
        sigma_max: float, states: str = STATES, **noise_dist: Any) -> Fitted | None:
    """Build and train (or resume) the network of a debiaser section on the training split, over
    [sigma_min, sigma_max]; None on ranks other than 0 under torchrun. `noise_dist` (sigma_dist,
    p_mean, p_std) replaces the section's: the baseline's way of training the same network with the
    same trainer over EDM's distribution."""
    import torch

    from dkgm.debias import Denoiser
    from dkgm.networks import build_network, count_parameters
    from dkgm.training import train

    prepared.kind.check_arch(cfg.arch, prepared.meta["dataset"])
    train_np = prepared.split("train")
    rank, world, device = init_distributed(cfg.device, "debiaser.device")  # a CUDA device comes back with TF32 and cudnn.benchmark on
    shape = tuple(train_np.shape[1:])
    net_cfg, train_cfg = configs(cfg, h, shape, device, sigma_max=sigma_max, **noise_dist)
    data = torch.from_numpy(train_np)
    sigma_data = float(data.std())
    torch.manual_seed(cfg.seed)  # network initialisation
    denoiser = Denoiser(build_network(net_cfg), sigma_data)
    data_key = {"dataset": prepared.meta["dataset"], "n_train": len(train_np), **data_extra, "sigma_data": sigma_data,
                "source": prepared.meta.get("source_sha256", prepared.meta.get("manifold"))}
    where = state_dir(root, net_cfg, train_cfg, data_key, states)
    key = json.loads(json.dumps(state_key(net_cfg, train_cfg, data_key), sort_keys=True))
    shown = where.relative_to(root) if where.is_relative_to(root) else where
    if rank == 0:
        for other in other_code_states(where, key):
            log.info("%s: ignored the training states in %s: same configuration and data, other training code "
                     "(dkgm/%s changed since)", label, other.name, ", dkgm/".join(TRAINING_CODE))
        where.mkdir(parents=True, exist_ok=True)
        if not (where / KEY_FILE).is_file():
            write_json(where / KEY_FILE, key)
    log.info("%s: %s, %.2fM parameters, %s on %s, states in %s", label, cfg.arch, count_parameters(denoiser) / 1e6,
             train_cfg.precision, device, shown)
    bar = Progress(f"{label} (images)", int(train_cfg.total_kimg * 1000))
    result = train(denoiser, data, train_cfg, state_dir=where, device=device,
                   progress=lambda nimg, total, row: bar(nimg, total, f"loss {row['loss']:.4f}"))
    bar.close()
    if rank != 0:
        return None
    if result.resumed_from is not None:
        log.info("%s: resumed from a state at %d images", label, result.resumed_from)
    return Fitted(rank, world, device, net_cfg, train_cfg, result, data, sigma_data, denoiser)

def loss_plot(path: Path, rows: list[dict], title: str = "debiaser training loss") -> None:
    fig, ax = new_figure(7, 4)
    if rows:
        kimg = np.array([r["nimg"] for r in rows]) / 1000
        ax.plot(kimg, [r["loss"] for r in rows], color="k", lw=1.5, label="loss (all sigma)")
        for key in [k for k in rows[0] if k.startswith("loss_sigma_")]:
            lo, hi = key[len("loss_sigma_"):].split("_")
            ax.plot(kimg, [r[key] for r in rows], lw=0.8, alpha=0.8, label=f"sigma in [{lo}, {hi})")
    ax.set_xlabel("thousands of images seen")
    ax.set_ylabel("EDM loss (|D - x0|^2 / c_out^2)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(title)
    save_figure(fig, path)

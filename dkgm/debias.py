"""The debiaser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM preconditioning) and its loss.

D estimates the clean image from x = x0 + sigma * eps. Stage-1 KDE samples at bandwidth h are
exactly this corruption at sigma = h, anchored at a training image, so the debiaser is trained
for sigma in [sigma_min, sigma_max] with sigma_max = c * h (c ~ 1.5 covers the KDE noise).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dkgm.errors import DKGMError, torch_load_reason


class Denoiser(nn.Module):
    """EDM preconditioning around a raw network `net(x, c_noise)`."""

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        if not sigma_data > 0:
            raise DKGMError(f"sigma_data must be positive, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        sd2 = self.sigma_data**2
        s2 = sigma * sigma
        c_skip = sd2 / (s2 + sd2)
        c_out = sigma * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1.0 / (s2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        view = (-1,) + (1,) * (x.ndim - 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        f = self.net((c_in.view(view) * x).to(x.dtype), c_noise)
        return c_skip.view(view) * x + c_out.view(view) * f.to(torch.float32)


SIGMA_DISTS = ("lognormal", "lognormal_truncated", "loguniform")


def sample_sigmas(n: int, sigma_min: float, sigma_max: float, generator: torch.Generator,
                  dist: str = "lognormal", p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    """Training noise levels (CPU, float32) on [sigma_min, sigma_max].

    - `lognormal`: ln sigma ~ N(p_mean, p_std^2) clipped to the range (EDM's training distribution,
      Karras et al. 2022: the budget goes where the loss can still be reduced and where a sampler
      spends its steps; the draws beyond an end sit on it);
    - `lognormal_truncated`: the same law conditioned on the range (inverse-CDF draws, no mass
      piles up at the ends);
    - `loguniform`: uniform in ln sigma (the ablation: about half of DKGM's draws fall below
      sigma = 0.05, where the loss is hard to reduce and matters little to the samples)."""
    if not 0 < sigma_min <= sigma_max:
        raise DKGMError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if dist == "loguniform":
        u = torch.rand(n, generator=generator)
        return torch.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min)))
    if not p_std > 0:
        raise DKGMError(f"the log-normal noise distribution needs p_std > 0, got {p_std}")
    if dist == "lognormal":
        z = torch.randn(n, generator=generator)
        return torch.exp(p_mean + p_std * z).clamp(sigma_min, sigma_max)
    if dist == "lognormal_truncated":
        lo, hi = ((math.log(s) - p_mean) / p_std for s in (sigma_min, sigma_max))
        cdf_lo, cdf_hi = (float(torch.special.ndtr(torch.tensor(v, dtype=torch.float64))) for v in (lo, hi))
        if cdf_hi - cdf_lo < 1e-12:
            raise DKGMError(f"the log-normal N({p_mean}, {p_std}^2) puts no mass on [{sigma_min:.4g}, {sigma_max:.4g}]")
        u = cdf_lo + (cdf_hi - cdf_lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        z = torch.special.ndtri(u)
        return torch.exp(p_mean + p_std * z).clamp(sigma_min, sigma_max).to(torch.float32)
    raise DKGMError(f"unknown sigma distribution {dist!r}: expected one of {', '.join(SIGMA_DISTS)}")


def denoising_loss(denoiser: Denoiser, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample EDM loss |D(x0 + sigma n; sigma) - x0|^2 / c_out^2, averaged over dimensions.
    The weight 1/c_out^2 gives the raw network a unit-variance target at every sigma."""
    view = (-1,) + (1,) * (x0.ndim - 1)
    d = denoiser(x0 + sigma.view(view) * noise, sigma)
    _, c_out, _, _ = denoiser.coefficients(sigma)
    err = ((d - x0) ** 2).flatten(1).mean(dim=1)
    return err / (c_out * c_out)


@torch.no_grad()
def denoising_mse(
    denoiser, x0: torch.Tensor, sigma: float, generator: torch.Generator, batch_size: int = 256,
    device: torch.device | str | None = None,
) -> float:
    """Mean per-coordinate squared error of D(x0 + sigma n; sigma) against x0 (the identity map
    scores sigma^2). `denoiser` is any (x, sigma) -> x callable; the device defaults to that of
    its parameters."""
    if device is None:
        device = next(denoiser.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(x0), batch_size):
        x = x0[s : s + batch_size]
        noise = torch.randn(x.shape, generator=generator).to(device)
        x = x.to(device)
        d = denoiser(x + sigma * noise, sigma)
        total += float(((d - x) ** 2).sum())
        count += x.numel()
    return total / max(count, 1)


def denoising_curve(denoiser, x0: torch.Tensor, sigmas, seed: int = 12345, batch_size: int = 256,
                    device: torch.device | str | None = None) -> list[dict[str, float]]:
    """Held-out denoising error against the noise level: one row per sigma with the network's
    per-coordinate MSE, the identity map's (sigma^2) and the mean image's (the data variance),
    and `ratio` = MSE / the better of the two trivial denoisers (< 1: the network beats both).
    Every sigma uses the same images and the same noise draws (seeded), so two networks scored
    with the same seed are compared on identical inputs."""
    mean_mse = float(((x0 - x0.mean(0)) ** 2).mean())
    rows = []
    for sigma in sigmas:
        mse = denoising_mse(denoiser, x0, float(sigma), torch.Generator().manual_seed(seed), batch_size, device)
        trivial = min(float(sigma) ** 2, mean_mse)
        rows.append({"sigma": float(sigma), "mse": mse, "identity_mse": float(sigma) ** 2, "mean_mse": mean_mse,
                     "ratio": mse / trivial if trivial > 0 else float("nan")})
    return rows


# ----------------------------------------------------------------------------- snapshots


def make_snapshot(ema: Denoiser, network: dict, **meta) -> dict:
    """What inference needs: EMA weights, the network config and the noise range (plain types
    and tensors only, so it loads with torch.load(weights_only=True))."""
    return {"ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()}, "network": network,
            "sigma_data": ema.sigma_data, **meta}


def load_denoiser(path, device: str | torch.device = "cpu") -> tuple[Denoiser, dict]:
    """Rebuild the EMA denoiser from a snapshot file; returns (denoiser in eval mode, snapshot meta)."""
    from pathlib import Path

    from dkgm.networks import NetworkConfig, build_network

    path = Path(path)
    if not path.is_file():
        raise DKGMError(f"debiaser snapshot not found: {path} (run train_debiaser first, or `dvc repro`)")
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True)
        cfg = NetworkConfig.from_dict(snap["network"])
    except Exception as exc:
        raise DKGMError(f"cannot read debiaser snapshot {path}: {torch_load_reason(exc)}") from None
    den = Denoiser(build_network(cfg), snap["sigma_data"])
    try:
        den.load_state_dict(snap["ema"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise DKGMError(f"debiaser snapshot {path}: its weights do not match its network config ({first})") from None
    meta = {k: v for k, v in snap.items() if k != "ema"}
    return den.to(device).eval().requires_grad_(False), meta

"""Running the debiasing update on a batch of samples, as every sampling stage does it.

refine (DKGM's stage 2), calibrate (its probe) and the diffusion baseline share this: the
denoiser in the resolved precision, and each sample's noise xi_k drawn from its own seed's
stream, so sample s is the same whatever the batch it falls in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dkgm.sampler import SAMPLER_FIELDS, DenoiseFn, Ladder, SamplerConfig, debias, make_ladder

if TYPE_CHECKING:
    import torch

    from dkgm.debias import Denoiser

# the refine section's sampler keys: calibrate and the comparison read these, so the operating point is
# chosen, and DKGM compared, with the sampler refine will run
SAMPLER_KEYS = tuple(f"refine.{name}" for name in SAMPLER_FIELDS)


def sampler_config(values: dict[str, Any] | Any) -> SamplerConfig:
    """A SamplerConfig from the refine section (a model with those fields) or from {"refine.<key>": value}."""
    if isinstance(values, dict):
        return SamplerConfig(**{k.split(".", 1)[1]: v for k, v in values.items() if k in SAMPLER_KEYS})
    return SamplerConfig(**{name: getattr(values, name) for name in SAMPLER_FIELDS})


def denoise_fn(denoiser: Denoiser, device: torch.device, precision: str) -> DenoiseFn:
    """D(x; sigma) under bf16 autocast when `precision` is bf16 (preconditioning stays float32)."""
    import torch


    def fn(x: torch.Tensor, sigma: float) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return denoiser(x, sigma)

    return fn


def debias_batch(fn: DenoiseFn, x0: np.ndarray, seeds: Sequence[int], ladder: Ladder, solver: str,
                 device: torch.device, keep: Sequence[int] = (), stream: str = "refine"
                 ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The ladder from x0 (float32, one row per seed); the final samples and the kept iterates."""
    import torch

    from dkgm.rng import randn_per_sample, sample_generators

    gens = sample_generators([int(s) for s in seeds], stream)
    with torch.inference_mode():
        x, kept = debias(fn, torch.from_numpy(np.ascontiguousarray(x0)).to(device), ladder, solver=solver, keep=keep,
                         noise=lambda k, shape: randn_per_sample(gens, shape[1:]).to(device))
    return x.float().cpu().numpy(), {k: v.float().cpu().numpy() for k, v in kept.items()}


def noise_start(seeds: np.ndarray, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """x_0 = sigma * eps, eps from each sample's own seed (stream "baseline/start")."""
    from dkgm.rng import randn_per_sample, sample_generators

    return (sigma * randn_per_sample(sample_generators(seeds.tolist(), "baseline/start"), shape)).numpy()


def sample_from_noise(fn, seeds: np.ndarray, shape: tuple[int, ...], sigma0: float, steps: int, solver: str, eta: float,
                      device: torch.device, batch_size: int, rho: float = 7.0, sigma_min: float = 0.002,
                      progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, int]:
    """Diffusion sampling: pure noise at sigma0, the Karras ladder, DKGM's update. (samples, NFE)."""
    ladder = make_ladder(sigma0, steps, "karras", eta, sigma_min, rho)
    out = np.empty((len(seeds), *shape), dtype=np.float32)
    for s in range(0, len(seeds), batch_size):
        sl = slice(s, s + batch_size)
        out[sl], _ = debias_batch(fn, noise_start(seeds[sl], shape, sigma0), seeds[sl], ladder, solver, device)
        if progress is not None:
            progress(min(s + batch_size, len(seeds)))
    return out, ladder.nfe(solver)

"""Stage 2 sampling: iterative debiasing of stage-1 samples (DESIGN 2.3).

Start from the KDE sample x_0 at noise level sigma_0 = h and walk a ladder
sigma_0 > sigma_1 > ... > sigma_{K-1} >= sigma_min, sigma_K = 0 with

    x_{k+1} = x_k + a_k (D(x_k; sigma_k) - x_k) + b_k xi_k,        xi_k ~ N(0, I)
    b_k = eta sigma_{k+1} sqrt(1 - sigma_{k+1}^2 / sigma_k^2),   a_k = 1 - sqrt(sigma_{k+1}^2 - b_k^2) / sigma_k

so that a perfect D moves the noise level from sigma_k to sigma_{k+1}. The deterministic part is
an Euler step of the probability-flow ODE dx/dsigma = (x - D)/sigma from sigma_k down to
sigma_hat_k = sqrt(sigma_{k+1}^2 - b_k^2); the noise b_k xi_k brings the level back up to
sigma_{k+1}. eta = 0 is the ODE, eta = 1 ancestral sampling. Heun adds a second evaluation at
sigma_hat_k (not on the last step, where sigma_hat = 0).

`robbins_monro`: a_k = a0 / (k+1)^gamma, the classic stochastic-approximation step size, with
sigma_{k+1} implied by sigma_{k+1}^2 = (1 - a_k)^2 sigma_k^2 + b_k^2; its last step jumps to D.

Churn (EDM's stochastic sampler, Karras et al. 2022, Alg. 2): on the steps whose sigma_k lies in
[churn_min, churn_max], first raise the level to sigma_k (1 + gamma), gamma = min(churn / K,
sqrt(2) - 1), with fresh noise of std sqrt((sigma_k (1 + gamma))^2 - sigma_k^2), then take the
step from that level. It re-noises where the network is most accurate and corrects errors of
earlier steps; eta re-noises after the step, everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from dkgm.errors import DKGMError

if TYPE_CHECKING:
    import torch

SCHEDULES = ("geometric", "karras", "robbins_monro")
SOLVERS = ("euler", "heun")

DenoiseFn = Callable[["torch.Tensor", float], "torch.Tensor"]
NoiseFn = Callable[[int, "torch.Size"], "torch.Tensor"]  # (step k, shape) -> xi_k on the samples' device


@dataclass(frozen=True)
class Ladder:
    sigmas: list[float]  # K + 1 noise levels, the last 0
    a: list[float]  # K step sizes
    b: list[float]  # K noise scales
    sigma_hat: list[float]  # K levels the deterministic part reaches
    sigma_up: list[float] | None = None  # K levels each step starts from after churn (None: no churn, sigmas[:-1])

    def start(self, k: int) -> float:
        """The level step k denoises at: sigma_k, raised by churn where it applies."""
        return self.sigmas[k] if self.sigma_up is None else self.sigma_up[k]

    @property
    def steps(self) -> int:
        return len(self.a)

    def nfe(self, solver: str) -> int:
        """Network evaluations per sample."""
        return self.steps + (sum(1 for s in self.sigma_hat if s > 0) if solver == "heun" else 0)


def _coefficients(s: float, s_next: float, eta: float) -> tuple[float, float, float]:
    b = eta * s_next * math.sqrt(max(0.0, 1.0 - (s_next / s) ** 2)) if s_next > 0 else 0.0
    s_hat = math.sqrt(max(0.0, s_next * s_next - b * b))
    return 1.0 - s_hat / s, b, s_hat


def make_ladder(
    sigma0: float,
    steps: int,
    schedule: str = "geometric",
    eta: float = 0.0,
    sigma_min: float = 0.002,
    rho: float = 7.0,
    a0: float = 0.5,
    gamma: float = 0.75,
    churn: float = 0.0,
    churn_min: float = 0.0,
    churn_max: float = float("inf"),
) -> Ladder:
    if steps < 1:
        raise DKGMError(f"the number of refinement steps K must be at least 1, got {steps}")
    if not 0.0 <= eta <= 1.0:
        raise DKGMError(f"the debiasing noise level eta must be in [0, 1], got {eta}")
    if schedule not in SCHEDULES:
        raise DKGMError(f"unknown schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if not (math.isfinite(sigma0) and sigma0 > 0):
        raise DKGMError(f"the starting noise level sigma_0 = h must be positive, got {sigma0}")
    if not 0 < sigma_min <= sigma0:
        raise DKGMError(f"sigma_min must be in (0, sigma_0 = {sigma0:.4g}], got {sigma_min}")
    if not churn >= 0:
        raise DKGMError(f"churn must be non-negative, got {churn}")
    if churn > 0 and schedule == "robbins_monro":
        raise DKGMError("churn applies to the geometric and karras ladders, not to robbins_monro")

    if schedule == "robbins_monro":
        if not 0.5 < gamma <= 1.0:
            raise DKGMError(f"robbins_monro needs gamma in (1/2, 1], got {gamma}")
        if not 0.0 < a0 < 1.0:
            raise DKGMError(f"robbins_monro needs a0 in (0, 1), got {a0}")
        sigmas, a, b, s_hat = [sigma0], [], [], []
        for k in range(steps - 1):
            ak, s = a0 / (k + 1) ** gamma, sigmas[-1]
            # t = sigma_{k+1}^2 / sigma_k^2 solves t = (1-a)^2 + eta^2 t (1 - t)
            if eta > 0:
                e2 = eta * eta
                t = (-(1 - e2) + math.sqrt((1 - e2) ** 2 + 4 * e2 * (1 - ak) ** 2)) / (2 * e2)
            else:
                t = (1 - ak) ** 2
            s_next = s * math.sqrt(t)
            bk = eta * s_next * math.sqrt(max(0.0, 1 - t))
            sigmas.append(s_next), a.append(ak), b.append(bk), s_hat.append(s * (1 - ak))
        sigmas.append(0.0), a.append(1.0), b.append(0.0), s_hat.append(0.0)
        return Ladder(sigmas, a, b, s_hat)

    if steps == 1:
        levels = [sigma0]
    elif schedule == "geometric":
        levels = [sigma0 * (sigma_min / sigma0) ** (k / (steps - 1)) for k in range(steps)]
    else:  # karras
        lo, hi = sigma_min ** (1 / rho), sigma0 ** (1 / rho)
        levels = [(hi + k / (steps - 1) * (lo - hi)) ** rho for k in range(steps)]
    if steps > 1:
        levels[0], levels[-1] = sigma0, sigma_min  # exact ends, free of pow() rounding
    sigmas = levels + [0.0]
    up = [s * (1 + min(churn / steps, math.sqrt(2) - 1)) if churn > 0 and churn_min <= s <= churn_max else s
          for s in levels]
    coeffs = [_coefficients(up[k], sigmas[k + 1], eta) for k in range(steps)]
    return Ladder(sigmas, [c[0] for c in coeffs], [c[1] for c in coeffs], [c[2] for c in coeffs],
                  up if any(u != s for u, s in zip(up, levels)) else None)


@dataclass(frozen=True)
class SamplerConfig:
    """The ladder and solver of a sampling run, whatever its start (DESIGN 2.3)."""

    schedule: str = "karras"
    steps: int = 10
    solver: str = "euler"
    sigma_min: float = 0.002
    rho: float = 7.0
    a0: float = 0.3
    gamma: float = 0.55
    churn: float = 0.0
    churn_min: float = 0.05
    churn_max: float = 1.0

    def ladder(self, sigma0: float, eta: float, steps: int | None = None) -> Ladder:
        return make_ladder(sigma0, self.steps if steps is None else steps, self.schedule, eta, self.sigma_min,
                           self.rho, self.a0, self.gamma, self.churn, self.churn_min, self.churn_max)

    def describe(self) -> str:
        churn = f", churn {self.churn:g} on [{self.churn_min:g}, {self.churn_max:g}]" if self.churn > 0 else ""
        return f"{self.schedule} ladder, K = {self.steps}, {self.solver}{churn}"


SAMPLER_FIELDS = tuple(f.name for f in fields(SamplerConfig))


def debias(
    denoise: DenoiseFn,
    x: torch.Tensor,
    ladder: Ladder,
    *,
    solver: str = "euler",
    noise: NoiseFn | None = None,
    keep: Sequence[int] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run the ladder from x = x_0 (stage-1 samples at sigma_0). Returns the final samples and
    the iterates at the steps listed in `keep` (k = 0 is the input, k = K the output)."""
    if solver not in SOLVERS:
        raise DKGMError(f"unknown solver {solver!r}: expected euler or heun")
    if noise is None and any(b > 0 for b in ladder.b):
        raise DKGMError("eta > 0 needs a noise source")
    if noise is None and ladder.sigma_up is not None:
        raise DKGMError("churn needs a noise source")
    import torch

    with torch.no_grad():  # not a decorator: this module imports without torch (the stage declarations use it)
        kept = {0: x.clone()} if 0 in keep else {}
        for k in range(ladder.steps):
            s, a, b, s_hat = ladder.start(k), ladder.a[k], ladder.b[k], ladder.sigma_hat[k]
            if s > ladder.sigmas[k]:  # churn: raise the level first
                assert noise is not None
                x = x + math.sqrt(s * s - ladder.sigmas[k] ** 2) * noise(k, x.shape)
            d = denoise(x, s)
            if solver == "heun" and s_hat > 0:
                slope = (x - d) / s
                x_euler = x + (s_hat - s) * slope
                slope2 = (x_euler - denoise(x_euler, s_hat)) / s_hat
                x_next = x + (s_hat - s) * 0.5 * (slope + slope2)
            else:
                x_next = x + a * (d - x)
            if b > 0:
                assert noise is not None
                x_next = x_next + b * noise(k, x.shape)
            x = x_next
            if k + 1 in keep:
                kept[k + 1] = x.clone()
        return x, kept

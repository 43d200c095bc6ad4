"""Device and precision choices: TF32 through one API only, distance passes at full float32, bf16
only where it is native, and devices errors naming their key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dkgm import devices
from dkgm.errors import DKGMError


@pytest.fixture
def tf32_on():
    """The settings configure_cuda makes on a GPU, applied here (they are plain flags on a CPU-only
    torch too), restored afterwards."""
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (m.fp32_precision, c.fp32_precision)
    devices._set_fp32_precision("tf32", "tf32")
    yield
    m.fp32_precision, c.fp32_precision = before


def test_code_that_runs_after_configure_cuda_never_mixes_the_legacy_tf32_api(tf32_on):
    """torch raises when the legacy float32-matmul-precision API is read after the per-backend one
    was set: every matmul path the stages take on a GPU must work in that state."""
    from dkgm import inception, kde, metrics

    with devices.exact_fp32():
        pass
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # restored
    rng = np.random.default_rng(0)
    q, r = rng.standard_normal((30, 8)), rng.standard_normal((40, 8))
    kde.topk_sq_distances(q, r, 3, device="cpu")
    metrics.precision_recall(q, r, 3)
    imgs = torch.from_numpy(rng.integers(0, 256, (2, 1, 28, 28), dtype=np.uint8))
    assert inception.batch_resize(imgs).shape == (2, 1, 299, 299)


def test_exact_fp32_switches_tf32_off_inside_and_back(tf32_on):
    with devices.exact_fp32():
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    with pytest.raises(ValueError), devices.exact_fp32():
        raise ValueError("inside")
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # restored on errors too


def test_precision_auto_and_explicit_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert devices.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert devices.resolve_precision("auto", cpu) == "bf16"
    assert devices.resolve_precision("fp32", cpu) == "fp32"
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(devices, "cuda_has_bf16", lambda d: False)
    assert devices.resolve_precision("auto", gpu) == "fp32"  # no emulated bf16 by default
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    with pytest.raises(DKGMError, match=r"refine.precision: bf16 but Tesla V100 has no bf16 units: set refine.precision"):
        devices.resolve_precision("bf16", gpu, "refine.precision")
    monkeypatch.setattr(devices, "cuda_has_bf16", lambda d: True)
    assert devices.resolve_precision("auto", gpu) == "bf16"


def test_a_missing_device_names_its_key():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DKGMError, match=r"^evaluate.device: 'cuda' but this machine has no CUDA device"):
        devices.resolve_device("cuda", "evaluate.device")
    with pytest.raises(DKGMError, match=r"kde.device: 'gpu' is not a device"):
        devices.resolve_device("gpu", "kde.device")

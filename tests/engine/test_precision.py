import pytest
import torch

from medseg.engine.precision import resolve_device, resolve_precision

CPU = torch.device("cpu")


def test_bf16_autocast_on_cpu_runs_matmuls_in_bf16():
    precision = resolve_precision("bf16", CPU)
    layer = torch.nn.Linear(4, 4)
    with precision.autocast():
        out = layer(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    assert not precision.grad_scaler().is_enabled()


def test_auto_is_fp32_on_cpu():
    precision = resolve_precision("auto", CPU)
    assert precision.name == "fp32"
    with precision.autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_fp16_without_cuda_is_an_error_in_the_arguments_terms():
    with pytest.raises(ValueError, match="mode='fp16' needs a CUDA device, got device 'cpu'"):
        resolve_precision("fp16", CPU)


def test_device_errors():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' but no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="^device must be"):
        resolve_device("gpu0")

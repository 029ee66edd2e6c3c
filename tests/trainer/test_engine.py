"""trainer/engine.py pieces that need no process group (the engine itself: tests/distributed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moetrain.distributed.deepspeed_patches import lean_bf16_step_applies
from moetrain.trainer import engine
from moetrain.trainer.engine import slow_dtype_warning

_MISSING = object()  # an attribute this DeepSpeed version does not have


def _unfused(**overrides):
    """A stand-in with the attributes of DeepSpeed 0.19's FP16_UnfusedOptimizer in a bf16 ZeRO-0 run."""
    attrs = dict(
        fp16_groups=[],
        fp32_groups=[],
        optimizer=object(),
        _update_scale=lambda skip: None,
        loss_scale_config=SimpleNamespace(use_grad_scaling=False, cur_scale=1.0),
        clip_grad=0.0,
        fused_lamb_legacy=False,
        custom_loss_scaler=False,
    )
    attrs.update(overrides)
    cls = type("FP16_UnfusedOptimizer", (), {})
    opt = cls()
    for k, v in attrs.items():
        if v is not _MISSING:
            setattr(opt, k, v)
    return opt


def test_lean_step_applies_to_bf16_without_loss_scale_or_clipping():
    assert lean_bf16_step_applies(_unfused())


@pytest.mark.parametrize(
    "override",
    [
        {"loss_scale_config": SimpleNamespace(use_grad_scaling=True, cur_scale=1.0)},  # fp16
        {"loss_scale_config": SimpleNamespace(use_grad_scaling=False, cur_scale=2.0)},
        {"clip_grad": 1.0},  # a user JSON asking DeepSpeed to clip
        {"fused_lamb_legacy": True},
        {"custom_loss_scaler": True},
        {"loss_scale_config": _MISSING},  # another DeepSpeed version: its own step, never a guess
        {"_update_scale": _MISSING},
        {"clip_grad": _MISSING},
    ],
    ids=[
        "fp16",
        "scaled",
        "ds_clipping",
        "lamb",
        "custom_scaler",
        "no_scale_config",
        "no_update_scale",
        "no_clip_grad",
    ],
)
def test_lean_step_falls_back_to_deepspeeds_step(override):
    assert not lean_bf16_step_applies(_unfused(**override))


def test_lean_step_only_for_the_unfused_optimizer():
    other = type("BF16_Optimizer", (), {})()
    other.__dict__.update(vars(_unfused()))
    assert not lean_bf16_step_applies(other)


def test_slow_dtype_warning_only_where_half_gemms_fall_back(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "onednn_runs_cpu_gemm", lambda dtype: False)  # an AVX2-only CPU
    msg = slow_dtype_warning(cpu, torch.bfloat16)
    assert msg is not None and "parallel.dtype=bf16" in msg and "use parallel.dtype=fp32" in msg
    assert slow_dtype_warning(cpu, torch.float32) is None
    assert slow_dtype_warning(torch.device("cuda", 0), torch.bfloat16) is None  # GPUs: not this check
    monkeypatch.setattr(engine, "onednn_runs_cpu_gemm", lambda dtype: True)  # AVX-512 / AMX
    assert slow_dtype_warning(cpu, torch.bfloat16) is None


def test_communication_options_reach_the_deepspeed_config():
    """parallel.grad_reduce_dtype -> communication_data_type; parallel.overlap_comm ->
    zero_optimization.overlap_comm (left out when null: DeepSpeed's own default)."""
    from moetrain.config import ParallelConfig, TrainConfig

    def ds(**parallel):
        return engine.deepspeed_config(TrainConfig(parallel=ParallelConfig(**parallel)).validate(), 2)

    assert ds()["communication_data_type"] == "fp32"
    assert ds(grad_reduce_dtype="bf16")["communication_data_type"] == "bf16"
    assert "overlap_comm" not in ds(zero_stage=2)["zero_optimization"]
    for stage in (1, 2, 3):
        for on in (True, False):
            assert ds(zero_stage=stage, overlap_comm=on)["zero_optimization"]["overlap_comm"] is on

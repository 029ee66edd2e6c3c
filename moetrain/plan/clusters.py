"""Cluster descriptions for the step-time model: presets from published hardware figures, or a file.

A description is a flat mapping (YAML or JSON file; ``python -m moetrain.plan plan.calibrate=FILE``
writes one for this machine):

* ``matmul_flops``: {dtype: peak dense matmul FLOP/s of one device}; ``gemm_efficiency``: the fraction
  of it a large GEMM reaches; ``gemm_half_rows``: rows at which a GEMM reaches half of that (small
  GEMMs, such as an expert's share of a micro-batch, run below peak: eff(m) = e·m / (m + m_half)).
* ``memory_bandwidth``: device memory, bytes/s (elementwise work, the optimizer step).
* ``intra_node_bandwidth`` / ``inter_node_bandwidth``: bytes/s one device sends, per direction;
  ``intra_node_latency`` / ``inter_node_latency``: seconds per collective step.
* ``devices_per_node``, ``memory_gib``; ``shared_compute``: devices of a node share ``matmul_flops``
  (CPU processes sharing the cores; a calibrated CPU sets it).
* ``host_bandwidth``: bytes/s between host and device (optimizer offload).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moetrain.config import ConfigError

# Published figures (dense, no sparsity):
# H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet: BF16 989 TFLOP/s, FP32 67 TFLOP/s, HBM3 3.35 TB/s,
#   NVLink 4 900 GB/s (both directions together: 450 per direction), PCIe Gen5 64 GB/s per direction;
#   InfiniBand NDR 400 Gb/s = 50 GB/s per GPU (one ConnectX-7 per GPU, as in DGX H100).
# H200 SXM: NVIDIA H200 datasheet: same compute as H100, HBM3e 4.8 TB/s, 141 GB.
# A100 SXM4 80GB: NVIDIA A100 datasheet: BF16 312 TFLOP/s, FP32 19.5 TFLOP/s, HBM2e 2.039 TB/s, NVLink 3
#   600 GB/s (300 per direction), PCIe Gen4 32 GB/s; InfiniBand HDR 200 Gb/s = 25 GB/s per GPU (DGX A100).
# gemm_efficiency 0.7 and gemm_half_rows 128 are typical of large cuBLAS GEMMs on these parts (an
# assumption, not a datasheet figure; calibrate a GPU host to replace them).
_GPU_COMMON = {"gemm_efficiency": 0.7, "gemm_half_rows": 128, "devices_per_node": 8, "shared_compute": False}
PRESETS: dict[str, dict[str, Any]] = {
    "h100_nvlink_ib400": {
        **_GPU_COMMON,
        "matmul_flops": {"bf16": 989e12, "fp32": 67e12},
        "memory_bandwidth": 3.35e12,
        "intra_node_bandwidth": 450e9,
        "inter_node_bandwidth": 50e9,
        "intra_node_latency": 5e-6,
        "inter_node_latency": 10e-6,
        "host_bandwidth": 64e9,
        "memory_gib": 80,
    },
    "h200_nvlink_ib400": {
        **_GPU_COMMON,
        "matmul_flops": {"bf16": 989e12, "fp32": 67e12},
        "memory_bandwidth": 4.8e12,
        "intra_node_bandwidth": 450e9,
        "inter_node_bandwidth": 50e9,
        "intra_node_latency": 5e-6,
        "inter_node_latency": 10e-6,
        "host_bandwidth": 64e9,
        "memory_gib": 141,
    },
    "a100_nvlink_ib200": {
        **_GPU_COMMON,
        "matmul_flops": {"bf16": 312e12, "fp32": 19.5e12},
        "memory_bandwidth": 2.039e12,
        "intra_node_bandwidth": 300e9,
        "inter_node_bandwidth": 25e9,
        "intra_node_latency": 5e-6,
        "inter_node_latency": 10e-6,
        "host_bandwidth": 32e9,
        "memory_gib": 80,
    },
}
REQUIRED = (
    "matmul_flops",
    "gemm_efficiency",
    "gemm_half_rows",
    "memory_bandwidth",
    "intra_node_bandwidth",
    "inter_node_bandwidth",
    "intra_node_latency",
    "inter_node_latency",
    "devices_per_node",
)


def load_cluster(name_or_file: str) -> dict[str, Any]:
    """A preset by name, or a YAML / JSON file; a one-line :class:`ConfigError` otherwise."""
    if name_or_file in PRESETS:
        return {"name": name_or_file, **PRESETS[name_or_file]}
    path = Path(name_or_file)
    if not path.is_file():
        raise ConfigError(
            f"plan.cluster={name_or_file!r} is invalid: one of {', '.join(PRESETS)} or a cluster file "
            "(python -m moetrain.plan plan.calibrate=FILE writes one)"
        )
    import yaml

    text = path.read_text()
    data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"plan.cluster={name_or_file!r}: not a mapping")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"plan.cluster={name_or_file!r}: missing {', '.join(missing)}")
    data.setdefault("name", path.stem)
    data.setdefault("shared_compute", False)
    data.setdefault("host_bandwidth", data["memory_bandwidth"])
    return data

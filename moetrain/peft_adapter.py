"""A LoRA checkpoint as a PEFT adapter folder (``python -m moetrain.export RUN OUT --adapter``).

``peft.PeftModel.from_pretrained(base, OUT)`` on the transformers base model gives the logits of the
merged export. The folder is written by PEFT itself (``adapter_config.json`` +
``adapter_model.safetensors``): the base is wrapped with a ``LoraConfig`` of the same targets,
each PEFT factor is filled from ours, and PEFT saves it. How ours map onto PEFT's:

- q/k/v/o, the shared expert (and its gate): ``target_modules`` (``nn.Linear``), A and B as they are.
- the router (``mlp.gate.weight``) and the fused experts (``mlp.experts.gate_up_proj`` [E, 2F, H],
  ``mlp.experts.down_proj`` [E, H, F]): ``target_parameters`` (PEFT's ``ParamWrapper``; its
  per-expert factors are ``lora_A`` [E*r, in] expert-major and ``lora_B`` [out, r*E] rank-major).
  Our separate gate (w1) and up (v1) adapters become one rank-2r adapter on gate_up_proj:
  A = [A_gate; A_up] and a block-diagonal B, with alpha doubled so alpha/r stays (``rank_pattern``).

What PEFT cannot hold: dropout on the expert adapters (its ParamWrapper refuses lora_dropout > 0),
so the adapter config says lora_dropout 0 when the experts are targeted (dropout only acts in
training; the logits are the same). Refused with a one-line error (the merged export holds them):
gpt-oss's experts (interleaved gate / up columns) and the DeepSeek-V3 / GLM-4.5 shared experts (PEFT's
transformers-v5 conversion retargets their ``down_proj`` to the routed experts). Multi-head latent
attention's projections are ``nn.Linear``s and go as q/k/v/o do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from moetrain.config import ModelConfig
from moetrain.hf import deepseek
from moetrain.model.lora import SUFFIX_A, SUFFIX_B

_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(w1|v1|w2)$")


def _hf_weight_name(ours: str, arch: str) -> str:
    from moetrain.hf.state import _LAYER, _LAYER_RENAMES, family_layer_renames

    family = family_layer_renames(arch)
    m = _LAYER.match(ours)
    rest = m.group(2) if m else None
    if rest is None or (rest not in family and rest not in _LAYER_RENAMES):
        raise ValueError(f"no transformers name for the adapted weight {ours!r}")
    return f"model.layers.{m.group(1)}.{family.get(rest) or _LAYER_RENAMES[rest]}"


def _peft_factors(
    adapters: dict[str, torch.Tensor], arch: str
) -> dict[tuple[str, str | None], tuple[torch.Tensor, torch.Tensor]]:
    """(transformers module, parameter name or None for an nn.Linear) -> PEFT's (lora_A, lora_B)."""
    out: dict[tuple[str, str | None], tuple[torch.Tensor, torch.Tensor]] = {}
    experts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in sorted(k for k in adapters if k.endswith(SUFFIX_A)):
        base = key.removesuffix(SUFFIX_A)
        A, B = adapters[key].float(), adapters[base + SUFFIX_B].float()
        m = _EXPERT.match(base)
        if m and arch == "GptOssForCausalLM":  # its gate_up_proj interleaves gate and up columns
            raise ValueError(
                "--adapter: gpt-oss's fused experts have no PEFT layout here; export the merged model "
                "(without --adapter) or train without model.lora.targets=experts"
            )
        if m:
            experts.setdefault(m.group(1), {})[m.group(2)] = (A, B)
            continue
        if ".shared_expert." in base and arch in deepseek.ARCHITECTURES:
            # PEFT's transformers-v5 conversion retargets a `down_proj` module to the fused experts' parameter
            raise ValueError(
                f"--adapter: PEFT cannot hold adapters on {arch}'s shared experts; export the merged model "
                "(without --adapter) or train without model.lora.targets=shared_expert"
            )
        module = _hf_weight_name(base, arch).removesuffix(".weight")
        # transformers' router is a module holding a `weight` parameter, the others are nn.Linears
        out[(module, "weight" if base.endswith(".router.gate.weight") else None)] = (A, B)
    for layer, w in experts.items():
        module = f"model.layers.{layer}.mlp.experts"
        (A1, B1), (A3, B3), (A2, B2) = w["w1"], w["v1"], w["w2"]
        E, r = A1.shape[0], A1.shape[1]
        A = torch.cat([A1, A3], dim=1)  # [E, 2r, H]
        B = torch.zeros(E, B1.shape[1] + B3.shape[1], 2 * r)  # [E, 2F, 2r] block-diagonal
        B[:, : B1.shape[1], :r], B[:, B1.shape[1] :, r:] = B1, B3
        out[(module, "gate_up_proj")] = _to_peft_grouped(A, B)
        out[(module, "down_proj")] = _to_peft_grouped(A2, B2)
    return out


def _to_peft_grouped(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ours (A [E, r, in], B [E, out, r]) -> PEFT's (lora_A [E*r, in], lora_B [out, r*E] rank-major)."""
    E, r, _ = A.shape
    return A.reshape(E * r, -1), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def write_peft_adapter(
    model_cfg: ModelConfig,
    base: dict[str, torch.Tensor],
    adapters: dict[str, torch.Tensor],
    out_dir: Path,
    base_path: str,
) -> dict[str, Any]:
    """Write the PEFT folder for ``adapters`` (our names) on ``base`` (our names) into ``out_dir``."""
    try:
        import peft
    except ImportError:
        raise ValueError("--adapter needs peft: pip install 'moetrain[lora]'") from None
    from moetrain.hf import hf_architecture, hf_model_from_state

    lc = model_cfg.lora
    factors = _peft_factors(adapters, hf_architecture(model_cfg))
    modules = sorted({m for m, p in factors if p is None})
    # target_parameters are matched by suffix: mlp.gate.weight, mlp.experts.gate_up_proj, ...
    targets = sorted({f"mlp.{m.split('.mlp.', 1)[1]}.{p}" for m, p in factors if p is not None})
    has_experts = any(p == "gate_up_proj" for _, p in factors)
    config = peft.LoraConfig(
        r=lc.rank,
        lora_alpha=lc.alpha,
        lora_dropout=0.0 if targets else lc.dropout,  # PEFT's ParamWrapper refuses dropout
        target_modules=modules,  # [] (not None: PEFT would add its defaults for the family)
        target_parameters=targets or None,
        rank_pattern={"gate_up_proj": 2 * lc.rank} if has_experts else {},
        alpha_pattern={"gate_up_proj": 2 * lc.alpha} if has_experts else {},
        base_model_name_or_path=base_path,
    )
    hf = hf_model_from_state(model_cfg, base)
    hf.name_or_path = hf.config.name_or_path = base_path  # adapter_config.json's base_model_name_or_path
    wrapped = peft.get_peft_model(hf, config)
    filled = 0
    for name, module in wrapped.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        path = name.removeprefix("base_model.model.").replace(".base_layer", "")
        key = (path, getattr(module, "parameter_name", None))
        A, B = factors[key]
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(A)
            module.lora_B["default"].weight.copy_(B)
        filled += 1
    if filled != len(factors):
        raise ValueError(f"PEFT wrapped {filled} layers, the checkpoint has adapters for {len(factors)}")
    wrapped.save_pretrained(str(out_dir))
    return {"modules": len(factors), "rank": lc.rank}

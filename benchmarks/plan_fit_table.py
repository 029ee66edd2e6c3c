"""The fit table of docs/PLAN.md: published models x (1 node, 2 nodes of 8 x 80 GiB), bf16 + AdamW,
micro-batch 1 x 4096 tokens, activation checkpointing; for each, every ZeRO / offload setting that fits.

    python benchmarks/plan_fit_table.py
"""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moetrain import CONFIG_DIR
from moetrain.config import model_config_from_dict
from moetrain.plan import fmt_bytes, memory_plan

MODELS = ("mixtral_8x7b", "mixtral_8x22b", "qwen3_30b_a3b", "olmoe_1b_7b")
SETTINGS = [(z, False) for z in (0, 1, 2, 3)] + [(z, True) for z in (1, 2, 3)]


def preset(name: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="plan", overrides=[f"model={name}"])
    return model_config_from_dict(OmegaConf.to_container(cfg.model, resolve=True))


def main() -> None:
    print("| model | ranks (ep) | fits 80 GiB per GPU (device total per GPU; host per GPU with offload) |")
    print("|---|---|---|")
    for name in MODELS:
        cfg = preset(name)
        for nodes in (1, 2):
            dp = 8 * nodes
            ep = 8  # experts over the GPUs of one node: the all-to-all stays on NVLink
            cells, fails = [], []
            for zero, offload in SETTINGS:
                m = memory_plan(
                    cfg,
                    ep_size=ep,
                    dp_size=dp,
                    zero_stage=zero,
                    offload_optimizer=offload,
                    dtype="bf16",
                    micro_batch_size=1,
                    seq_len=4096,
                    activation_checkpointing=True,
                )
                r = m["per_rank"]
                label = f"ZeRO-{zero}" + (" + offload" if offload else "")
                text = f"{label} ({fmt_bytes(r['device_total'])}" + (
                    f"; host {fmt_bytes(r['host_total'])})" if offload else ")"
                )
                (cells if m["fits"] else fails).append(text)
            best_fail = fails[-1] if fails else ""
            print(
                f"| {name} | {dp} ({ep}) | {', '.join(cells) or 'nothing'}"
                + (f"; not: {', '.join(f.split(' (')[0] for f in fails)}" if fails else "")
                + " |"
            )
        _ = best_fail


if __name__ == "__main__":
    main()

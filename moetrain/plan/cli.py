"""``python -m moetrain.plan``: the Hydra entry point."""

from __future__ import annotations

import json
import sys
from typing import Any

from moetrain.config import ConfigError
from moetrain.plan.params import BYTES_PER_PARAM
from moetrain.plan.report import build_plan, render


def _plan_from_cfg(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from moetrain.config import model_config_from_dict, parallel_config_from_dict

    model_cfg = model_config_from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    par = parallel_config_from_dict(OmegaConf.to_container(cfg.parallel, resolve=True))
    plan_cfg = OmegaConf.to_container(cfg.get("plan", {}), resolve=True) or {}
    fmt = plan_cfg.get("format", "table")
    if fmt not in ("table", "json"):
        raise ConfigError(f"plan.format={fmt!r} is invalid: one of table, json")
    seq_len = plan_cfg.get("seq_len")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len <= 0):
        raise ConfigError(
            f"plan.seq_len={seq_len!r} is invalid: a positive integer or null (= model.max_seq_len)"
        )
    dtype = plan_cfg.get("dtype") or (par.dtype if par.dtype != "auto" else "bf16")
    if dtype not in BYTES_PER_PARAM:
        raise ConfigError(f"plan.dtype={dtype!r} is invalid: one of fp32, bf16 (or null)")
    gib = plan_cfg.get("device_memory_gib", 80)
    if not isinstance(gib, int | float) or isinstance(gib, bool) or gib <= 0:
        raise ConfigError(f"plan.device_memory_gib={gib!r} is invalid: a positive number of GiB per device")
    micro_batch = plan_cfg.get("micro_batch_size") or cfg.optim.micro_batch_size
    if not isinstance(micro_batch, int) or micro_batch <= 0:
        raise ConfigError(f"plan.micro_batch_size={micro_batch!r} is invalid: a positive integer or null")
    # The layout settings every estimate reads (build_plan, step_time and the ep sweep alike).
    layout = dict(
        zero_stage=par.zero_stage,
        dtype=dtype,
        seq_len=seq_len,
        micro_batch_size=micro_batch,
        activation_checkpointing=par.activation_checkpointing,
        offload_optimizer=par.offload_optimizer,
    )
    # what only the step time reads
    comm = dict(
        grad_reduce_dtype=par.grad_reduce_dtype, overlap_comm=par.overlap_comm, a2a_chunks=par.a2a_chunks
    )
    plan = build_plan(
        model_cfg,
        ep_size=par.ep_size,
        dp_size=plan_cfg.get("dp_size"),
        **layout,
        device_memory_gib=float(gib),
        disk_gbps=float(plan_cfg.get("disk_gbps") or 2.0),
        ranks_per_node=int(plan_cfg.get("ranks_per_node") or 8),
    )
    dp_size = plan["memory"]["layout"]["dp_size"]
    cluster_name = plan_cfg.get("cluster")
    if cluster_name:
        from moetrain.plan.clusters import load_cluster
        from moetrain.plan.step_time import step_time

        grad_accum = plan_cfg.get("grad_accum") or cfg.optim.grad_accum
        plan["step_time"] = step_time(
            model_cfg,
            load_cluster(str(cluster_name)),
            ep_size=par.ep_size,
            dp_size=dp_size,
            grad_accum=grad_accum,
            **layout,
            **comm,
        )
    sweep = plan_cfg.get("sweep")
    if sweep:
        if sweep != "ep_size" or not cluster_name:
            raise ConfigError(
                f"plan.sweep={sweep!r} is invalid: ep_size (with plan.cluster=NAME_OR_FILE for the step time)"
            )
        plan["sweep"] = _sweep_ep(model_cfg, layout, dp_size, plan, grad_accum, str(cluster_name), comm)
    plan["vocab_source"] = _vocab_source(cfg)
    return {"format": fmt, "plan": plan}


def _sweep_ep(
    model_cfg: Any,
    layout: dict[str, Any],
    dp: int,
    plan: dict[str, Any],
    grad_accum: int,
    cluster_name: str,
    comm: dict[str, Any],
) -> list[dict[str, Any]]:
    """Predicted tokens/s and device memory for every ep_size that divides the experts and the ``dp``
    ranks, the other ``layout`` settings held."""
    from moetrain.plan.clusters import load_cluster
    from moetrain.plan.memory import memory_plan
    from moetrain.plan.step_time import step_time

    cluster = load_cluster(cluster_name)
    rows = []
    for ep in range(1, dp + 1):
        if dp % ep or (ep > 1 and model_cfg.num_experts % ep):
            continue
        kw = dict(layout, ep_size=ep, dp_size=dp)
        st = step_time(model_cfg, cluster, grad_accum=grad_accum, **kw, **comm)
        mem = memory_plan(model_cfg, device_memory_gib=plan["memory"]["device_memory_gib"], **kw)
        rows.append(
            {
                "ep_size": ep,
                "tokens_per_s": st["tokens_per_s"],
                "total_s": st["total_s"],
                "all_to_all_s": st["all_to_all_s"],
                "device_total": mem["per_rank"]["device_total"],
                "fits": mem["fits"],
            }
        )
    return rows


def _vocab_source(cfg: Any) -> str:
    """Where model.vocab_size came from: the data preset's tokenizer size, or the model itself."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg.model, resolve=False).get("vocab_size")
    if isinstance(raw, str) and "data.vocab_size" in raw:
        return f"data.vocab_size (data={cfg.data.name})"
    return "model.vocab_size"


def _hydra_entry() -> None:
    import hydra

    from moetrain import CONFIG_DIR

    @hydra.main(config_path=str(CONFIG_DIR), config_name="plan", version_base="1.3")
    def _main(cfg: Any) -> None:
        target = (cfg.get("plan") or {}).get("calibrate")
        if target:
            from moetrain.plan.calibrate import write_calibration

            data = write_calibration(str(target))
            print(
                f"wrote {target}: {json.dumps({k: data[k] for k in ('matmul_flops', 'memory_bandwidth', 'intra_node_bandwidth')})}"
            )
            return
        try:
            out = _plan_from_cfg(cfg)
        except Exception as e:  # ConfigError, and OmegaConf's interpolation errors
            lines = str(e).strip().splitlines()
            print(f"error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
            sys.exit(2)
        if out["format"] == "json":
            print(json.dumps(out["plan"], indent=2))
        else:
            render(out["plan"])
        for row in out["plan"].get("sweep", []) if out["format"] != "json" else []:
            print(
                f"ep_size={row['ep_size']}: {row['tokens_per_s']:,.0f} tokens/s predicted "
                f"(all-to-all {row['all_to_all_s']:.3g} s of {row['total_s']:.3g} s), "
                f"{row['device_total'] / 2**30:.1f} GiB per device, {'fits' if row['fits'] else 'does NOT fit'}"
            )

    _main()


def main() -> None:
    _hydra_entry()

"""``python -m moetrain.train +experiment=mixtral_small [key=value ...]`` — the Hydra entry point.

Works the same under ``python``, ``torchrun`` and the ``deepspeed`` launcher. Bad configuration
stops with one line ``error: ...`` (exit code 2) before any expensive work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from moetrain import CONFIG_DIR as _CONFIG_DIR  # noqa: E402
from moetrain.config import ConfigError, TrainConfig, check_world_size, train_config_from_dict  # noqa: E402
from moetrain.distributed.env import strip_launcher_args  # noqa: E402

CONFIG_DIR = str(_CONFIG_DIR)


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_launch(cfg: TrainConfig) -> None:
    """Checks that need the launch, not just the config: enough processes for ``parallel.ep_size``
    and enough memory for one process's training state. Before any model, data or engine work."""
    from moetrain.distributed.env import discover_launch_env

    launch = discover_launch_env()  # torchrun, deepspeed, OpenMPI, MVAPICH, MPICH or srun variables
    world_size = int(launch["WORLD_SIZE"])
    check_world_size(cfg.parallel, world_size)
    if not cfg.parallel.check_memory:
        return
    import torch

    from moetrain.plan import check_memory_fits, machine_memory, resolve_dtype

    machine = machine_memory(int(launch["LOCAL_RANK"]), int(launch.get("LOCAL_WORLD_SIZE", "1")))
    if machine is None:  # unknown on this platform: nothing to compare against
        return
    check_memory_fits(
        cfg.model,
        ep_size=cfg.parallel.ep_size,
        world_size=world_size,
        zero_stage=cfg.parallel.zero_stage,
        dtype=resolve_dtype(cfg.parallel.dtype),
        available=machine[0],
        machine=machine[1],
        offload_optimizer=cfg.parallel.offload_optimizer,
        micro_batch_size=cfg.optim.micro_batch_size,
        seq_len=cfg.data.seq_len,
        activation_checkpointing=cfg.parallel.activation_checkpointing,
        host_is_device=not torch.cuda.is_available(),
    )


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(raw: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig

    try:
        plain = OmegaConf.to_container(raw, resolve=True)
        cfg = train_config_from_dict(plain, cross_checks=False)  # type: ignore[arg-type]
        from moetrain.pretrained import resolve_pretrained

        # model.init_from / upcycle_from: shape from the checkpoint's config, weights checked by name
        notes = resolve_pretrained(cfg, list(HydraConfig.get().overrides.task))
        cfg.validate()
        check_launch(cfg)
        if cfg.model.num_experts > 0:  # an impossible MoE backend fails before any data work
            from moetrain.moe.backends import resolve_backend

            resolve_backend(cfg.model.moe.backend)
    except Exception as e:  # ConfigError, and OmegaConf's interpolation errors
        _fail(str(e).splitlines()[0])
    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(note, flush=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from moetrain.checkpoint.model_file import CheckpointError
    from moetrain.checkpoint.save_errors import SaveFailure
    from moetrain.data import DataError
    from moetrain.distributed.env import LaunchError, shutdown_distributed
    from moetrain.trainer import Trainer
    from moetrain.trainer.guards import TrainingDiverged

    try:
        code = Trainer(cfg, run_dir).run()
    except (ConfigError, CheckpointError, DataError, LaunchError, FileNotFoundError) as e:
        if getattr(e, "reported_by_rank0", False) and int(os.environ.get("RANK", "0")) != 0:
            sys.exit(2)  # the same error on every rank: one line (rank 0's) is enough
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except SaveFailure as e:  # a failed save the policy (or the last save) says stops the run
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except TrainingDiverged as e:  # numeric fault beyond trainer.on_nonfinite's policy
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    # Every rank has passed the run's last barrier (not so on the error paths above, where a rank may
    # still have a collective in flight).
    shutdown_distributed()
    if code:
        sys.exit(code)
    return 0


if __name__ == "__main__":
    from moetrain.cli import run_then_exit

    sys.argv = strip_launcher_args(sys.argv)
    run_then_exit(main)  # no interpreter finalization, where gloo's threads can abort (cli.py says why)

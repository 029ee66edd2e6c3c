#!/usr/bin/env bash
# Single-node training with N processes (CPU/gloo or GPU/NCCL), launched by torchrun.
#
# Usage:
#   scripts/train_local.sh [--dry-run] [hydra overrides...]
#   NPROC=2 scripts/train_local.sh +experiment=mixtral_tiny parallel.ep_size=2
#
# Environment:
#   NPROC        processes on this machine (default: number of visible GPUs, else 1). Visible GPUs:
#                those `nvidia-smi -L` lists, narrowed to CUDA_VISIBLE_DEVICES when that is set
#                (set but empty: no GPU, so 1 CPU process)
#   PYTHON       interpreter (default: <repo>/.venv/bin/python if present, else python)
#   MODULE       python module to launch (default: moetrain.train)
#   SCRIPT       launch this python file instead of MODULE (path)
#   MASTER_PORT  rendezvous port; when unset, torchrun --standalone picks a free one
#   DRY_RUN=1    print the command and exit (same as --dry-run)
#
# Every other argument is passed unchanged to moetrain.train (Hydra overrides). The command runs
# from the repository root so relative paths (configs, outputs/) resolve the same from anywhere.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/common.sh
source "$REPO_ROOT/scripts/common.sh"

parse_launch_args "${BASH_SOURCE[0]}" "$@"

PY="$(venv_tool python "${PYTHON:-}")"

if [[ -z "${NPROC:-}" ]]; then
  NPROC=1
  n_gpu="$(visible_gpu_count)"
  if [[ "$n_gpu" -gt 0 ]]; then NPROC="$n_gpu"; fi
fi

if [[ -n "${SCRIPT:-}" ]]; then
  target=("$(cd "$(dirname "$SCRIPT")" && pwd)/$(basename "$SCRIPT")")
else
  target=(-m "${MODULE:-moetrain.train}")
fi

if [[ -n "${MASTER_PORT:-}" ]]; then
  rdzv=(--nnodes 1 --master_addr 127.0.0.1 --master_port "$MASTER_PORT")
else
  rdzv=(--standalone)
fi

cmd=("$PY" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node "$NPROC" "${target[@]}" ${args[@]+"${args[@]}"})

cd "$REPO_ROOT"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
show_and_run "${cmd[@]}"

#!/usr/bin/env bash
# Multi-node training through the DeepSpeed launcher (`deepspeed --hostfile ... --module moetrain.train`).
#
# Usage:
#   HOSTFILE=hosts scripts/train_multinode.sh [--dry-run] [hydra overrides...]
#   HOSTFILE=hosts GPUS_PER_NODE=8 scripts/train_multinode.sh +experiment=mixtral_small parallel.ep_size=8
#   # no ssh: run this on every node yourself (e.g. one task per node from srun), same args + NODE_RANK
#   NO_SSH=1 NODE_RANK=1 MASTER_ADDR=10.0.0.1 HOSTFILE=hosts scripts/train_multinode.sh ...
#   DRY_RUN=1 HOSTFILE=scripts/hostfile.example scripts/train_multinode.sh trainer.max_steps=10
#
# Environment (all optional except HOSTFILE):
#   HOSTFILE       DeepSpeed/MPI-style hostfile, one `hostname slots=N` per line (see hostfile.example)
#   NUM_NODES      use the first N hosts of the hostfile        -> --num_nodes
#   GPUS_PER_NODE  use GPUs [0, N) on each node                  -> --num_gpus
#   MASTER_ADDR    address of node 0 (default: first host of the hostfile) -> --master_addr
#   MASTER_PORT    rendezvous port (default 29500)               -> --master_port
#   NO_SSH=1       launch only this node's processes (--no_ssh); needs NODE_RANK -> --node_rank
#   NODE_RANK      this node's index in the hostfile, 0-based (NO_SSH mode only)
#   DS_LAUNCHER    multi-node backend: pdsh (DeepSpeed's default), openmpi, mvapich, slurm, ... -> --launcher
#   DS_LAUNCHER_ARGS  extra arguments for that backend (one string)  -> --launcher_args
#   SSH_PORT       ssh port for pdsh                              -> --ssh_port
#   DS_ARGS        further deepspeed launcher flags, word-split (e.g. "--enable_each_rank_log=logs")
#   MODULE         python module to launch (default moetrain.train); SCRIPT=path.py launches a file
#   DEEPSPEED      launcher executable (default <repo>/.venv/bin/deepspeed if present, else deepspeed)
#   DS_ENV_OUT     where to write the environment file (default <repo>/outputs/launch/deepspeed_env)
#   DS_ENV_VARS    extra variable names to propagate, space-separated
#   DRY_RUN=1      print the env file and the command, run nothing (same as --dry-run)
#
# Environment propagation. With ssh (pdsh/mpi backends) the launcher on this node starts the other
# nodes, so variables must be carried explicitly. DeepSpeed (launcher/runner.py) exports every variable
# whose name starts with PYTHON, MLFLOW, MV2, UCX or the accelerator's prefixes (NCCL on CUDA), plus
# every KEY=VALUE line of the file named by $DS_ENV_FILE (default ".deepspeed_env"), looked up in
# $HOME and in the current directory. This script writes such a file with NCCL_*, TORCH_NCCL_*,
# WANDB_*, HF_*, TRANSFORMERS_*, MOETRAIN_*, PYTHONPATH, OMP_NUM_THREADS, CUDA_DEVICE_MAX_CONNECTIONS
# and $DS_ENV_VARS, merged after the lines of any existing ~/.deepspeed_env and ./.deepspeed_env, and
# points DS_ENV_FILE at it (an absolute path: runner.py joins it onto both directories, which yields
# the path itself). It goes under outputs/ rather than ./.deepspeed_env so the repository root stays
# clean and a hand-written ./.deepspeed_env is never overwritten. DeepSpeed reads the file only in
# ssh mode, so with NO_SSH=1 none is written: there every node's processes inherit the environment
# of the shell that ran this script on that node.
#
# ssh mode requirements: passwordless ssh to every host, pdsh installed, and this repository plus the
# same python/venv at the same absolute path on every node (pdsh runs `cd $PWD; <python> -m
# deepspeed.launcher.launch ...` remotely). The command runs from the repository root.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/common.sh
source "$REPO_ROOT/scripts/common.sh"

die() {
  echo "train_multinode.sh: $*" >&2
  exit 2
}

parse_launch_args "${BASH_SOURCE[0]}" "$@"

# --- launcher executable -------------------------------------------------------------------------
DS_BIN="$(venv_tool deepspeed "${DEEPSPEED:-}")"

# --- hostfile ------------------------------------------------------------------------------------
[[ -n "${HOSTFILE:-}" ]] || die "set HOSTFILE (lines like 'node-0 slots=8'; see scripts/hostfile.example)"
if [[ -f "$HOSTFILE" ]]; then
  HOSTFILE="$(cd "$(dirname "$HOSTFILE")" && pwd)/$(basename "$HOSTFILE")"
elif [[ "$DRY_RUN" == "1" ]]; then
  echo "train_multinode.sh: warning: HOSTFILE $HOSTFILE does not exist" >&2
else
  die "HOSTFILE $HOSTFILE does not exist"
fi

# Hosts in hostfile order (comments and blank lines skipped), as DeepSpeed's fetch_hostfile reads it.
hosts=()
if [[ -f "$HOSTFILE" ]]; then
  while read -r host _; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    hosts+=("$host")
  done <"$HOSTFILE"
  [[ ${#hosts[@]} -gt 0 ]] || die "HOSTFILE $HOSTFILE lists no hosts"
fi

MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${MASTER_ADDR:-}" ]]; then
  if [[ ${#hosts[@]} -gt 0 ]]; then
    MASTER_ADDR="${hosts[0]}"
  else
    MASTER_ADDR="127.0.0.1"
  fi
fi

# --- launcher flags ------------------------------------------------------------------------------
ds=("$DS_BIN" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
[[ -n "${NUM_NODES:-}" ]] && ds+=(--num_nodes "$NUM_NODES")
[[ -n "${GPUS_PER_NODE:-}" ]] && ds+=(--num_gpus "$GPUS_PER_NODE")
if [[ "${NO_SSH:-0}" == "1" ]]; then
  [[ -n "${NODE_RANK:-}" ]] || die "NO_SSH=1 needs NODE_RANK (this node's 0-based index in the hostfile)"
  ds+=(--no_ssh --node_rank "$NODE_RANK")
fi
[[ -n "${DS_LAUNCHER:-}" ]] && ds+=(--launcher "$DS_LAUNCHER")
[[ -n "${DS_LAUNCHER_ARGS:-}" ]] && ds+=(--launcher_args "$DS_LAUNCHER_ARGS")
[[ -n "${SSH_PORT:-}" ]] && ds+=(--ssh_port "$SSH_PORT")
if [[ -n "${DS_ARGS:-}" ]]; then
  read -r -a extra_ds <<<"$DS_ARGS"
  ds+=("${extra_ds[@]}")
fi

if [[ -n "${SCRIPT:-}" ]]; then
  ds+=("$(cd "$(dirname "$SCRIPT")" && pwd)/$(basename "$SCRIPT")")
else
  ds+=(--module "${MODULE:-moetrain.train}")
fi
cmd=("${ds[@]}" ${args[@]+"${args[@]}"})

# --- environment file ----------------------------------------------------------------------------
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
DS_ENV_OUT="${DS_ENV_OUT:-$REPO_ROOT/outputs/launch/deepspeed_env}"
case "$DS_ENV_OUT" in /*) ;; *) DS_ENV_OUT="$PWD/$DS_ENV_OUT" ;; esac

# DeepSpeed splits each line at the first '=' (a line without one crashes it) and pastes the value
# into `export KEY=VALUE;` of a remote shell, double-quoting it if it has characters outside
# [A-Za-z0-9_@%+=:,./-]. Values containing '"', '$', '`', '\' or a newline cannot survive that.
env_line_ok() { [[ "$1" =~ ^[A-Za-z_][A-Za-z0-9_]*= && "$1" != *[\"\$\`\\]* ]]; }

build_env_file() {
  local line name f
  local -a names=()
  # lines of the files DeepSpeed would have read itself, had DS_ENV_FILE not been redirected
  for f in "${HOME:-/nonexistent}/.deepspeed_env" "$REPO_ROOT/.deepspeed_env"; do
    [[ -f "$f" ]] || continue
    while IFS= read -r line || [[ -n "$line" ]]; do
      env_line_ok "$line" && printf '%s\n' "$line"
    done <"$f"
  done
  local -a extra=()
  read -r -a extra <<<"${DS_ENV_VARS:-}"
  while IFS= read -r name; do names+=("$name"); done < <({ compgen -e; printf '%s\n' ${extra[@]+"${extra[@]}"}; } | sort -u)
  for name in ${names[@]+"${names[@]}"}; do
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    case "$name" in
      NCCL_* | TORCH_NCCL_* | WANDB_* | HF_* | TRANSFORMERS_* | MOETRAIN_* | PYTHONPATH | OMP_NUM_THREADS | \
        CUDA_DEVICE_MAX_CONNECTIONS | HYDRA_FULL_ERROR) ;;
      *) [[ " ${DS_ENV_VARS:-} " == *" $name "* ]] || continue ;;
    esac
    [[ -n "${!name+x}" ]] || continue
    line="$name=${!name}"
    if [[ "$line" == *$'\n'* ]] || ! env_line_ok "$line"; then
      echo "train_multinode.sh: warning: not propagating $name (value has quotes, \$, \\ or a newline)" >&2
      continue
    fi
    printf '%s\n' "$line"
  done
}

cd "$REPO_ROOT"
if [[ "${NO_SSH:-0}" == "1" ]]; then
  show_and_run "${cmd[@]}"
fi

# later lines win: DeepSpeed stores the exports in a dict
env_text="$(build_env_file)"
if [[ "$DRY_RUN" == "1" ]]; then
  echo "# environment file ($DS_ENV_OUT, not written: dry run)"
  # WANDB_API_KEY and friends stay out of the log
  sed -E 's/^([A-Z_]*(KEY|TOKEN|SECRET|PASSWORD)[A-Z_]*)=.*/\1=<redacted>/' <<<"$env_text"
else
  mkdir -p "$(dirname "$DS_ENV_OUT")"
  umask 077
  printf '%s\n' "$env_text" | sed '/^$/d' >"$DS_ENV_OUT"
  export DS_ENV_FILE="$DS_ENV_OUT"
  echo "train_multinode.sh: environment for remote nodes in $DS_ENV_FILE ($(wc -l <"$DS_ENV_OUT") variables)"
fi

show_and_run "${cmd[@]}"

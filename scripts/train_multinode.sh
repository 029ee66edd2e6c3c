#!/usr/bin/env bash
# Multi-node training through the DeepSpeed launcher (`deepspeed --hostfile ... --module moetrain.train`).
#
# Usage:
#   HOSTFILE=hosts scripts/train_multinode.sh [--dry-run] [hydra overrides...]
#   HOSTFILE=hosts GPUS_PER_NODE=8 scripts/train_multinode.sh +experiment=mixtral_small parallel.ep_size=8
#   # no ssh: run this on every node yourself (e.g. one task per node from srun), same args + NODE_RANK
#   NO_SSH=1 NODE_RANK=1 MASTER_ADDR=10.0.0.1 HOSTFILE=hosts scripts/train_multinode.sh ...
#   DRY_RUN=1 HOSTFILE=scripts/hostfile.example scripts/train_multinode.sh trainer.max_steps=10
#   # MPI instead of pdsh (ranks from OMPI_COMM_WORLD_*), or srun inside an allocation (see "Backends"):
#   DS_LAUNCHER=openmpi HOSTFILE=hosts scripts/train_multinode.sh ...
#   DS_LAUNCHER=slurm DS_LAUNCHER_ARGS="--ntasks-per-node=8" HOSTFILE=hosts scripts/train_multinode.sh ...
#
# Environment (all optional except HOSTFILE):
#   HOSTFILE       DeepSpeed/MPI-style hostfile, one `hostname slots=N` per line (see hostfile.example)
#   NUM_NODES      use the first N hosts of the hostfile        -> --num_nodes (MPI backends: see below)
#   GPUS_PER_NODE  use GPUs [0, N) on each node                  -> --num_gpus  (MPI backends: see below)
#   MASTER_ADDR    address of node 0 (default: first host of the hostfile) -> --master_addr; with
#                  openmpi/mvapich/slurm also exported to every process (with MASTER_PORT)
#   MASTER_PORT    rendezvous port (default 29500)               -> --master_port
#   NO_SSH=1       launch only this node's processes (--no_ssh); needs NODE_RANK -> --node_rank
#   NODE_RANK      this node's index in the hostfile, 0-based (NO_SSH mode only)
#   DS_LAUNCHER    multi-node backend: pdsh (default), openmpi, mvapich, slurm, mpich, impi -> --launcher
#                  (see "Backends" below)
#   DS_LAUNCHER_ARGS  extra arguments for that backend (one string)  -> --launcher_args
#   SSH_PORT       ssh port for pdsh                              -> --ssh_port
#   DS_ARGS        further deepspeed launcher flags, word-split (e.g. "--enable_each_rank_log=logs")
#   MODULE         python module to launch (default moetrain.train); SCRIPT=path.py launches a file
#   DEEPSPEED      launcher executable (default <repo>/.venv/bin/deepspeed if present, else deepspeed)
#   DS_ENV_OUT     where to write the environment file (default <repo>/outputs/launch/deepspeed_env)
#   DS_ENV_VARS    extra variable names to propagate, space-separated
#   DRY_RUN=1      print the env file (and generated hostfile) and the command, run nothing (= --dry-run)
#
# Backends (DeepSpeed 0.19 launcher/multinode_runner.py). Each starts the training processes
# differently, and moetrain.train finds its rank in whatever variables the backend sets
# (moetrain.distributed.env.discover_launch_env):
#   pdsh     ssh to every host and run DeepSpeed's per-node launcher there, which sets RANK, WORLD_SIZE,
#            LOCAL_RANK, MASTER_ADDR and MASTER_PORT (--master_addr/--master_port) for its workers.
#   openmpi  `mpirun -n <total slots> -hostfile HOSTFILE -x K=V ... python -u -m MODULE`: python is
#            started directly; ranks come from OMPI_COMM_WORLD_*. mpirun does not carry MASTER_ADDR /
#            MASTER_PORT to other hosts and DeepSpeed does not add them, so this script puts both into
#            the environment file (each line becomes `-x K=V`). DeepSpeed also adds
#            `--mca btl_tcp_if_include eth0` unless DS_LAUNCHER_ARGS names btl_tcp_if_include itself.
#   mvapich  `mpirun -np N -ppn P --hostfile /tmp/deepspeed_mvapich_hostfile -env K=V ... python -u -m
#            MODULE`; ranks from MV2_COMM_WORLD_*; MASTER_ADDR/MASTER_PORT via the environment file, as
#            for openmpi. Needs MVAPICH2-GDR (DeepSpeed checks `mpiname`) and equal slots on every host.
#   slurm    `srun -n <total> [--nodes N] [--gpus-per-node G] --export=ALL,K=V,... python -u FILE`, run
#            inside an allocation (salloc/sbatch); ranks from SLURM_PROCID/SLURM_LOCALID/
#            SLURM_STEP_*. This backend ignores --module (it always runs a file), so the command names
#            scripts/run_module.py with the module as its first argument (the same as `python -m`).
#            MASTER_ADDR/MASTER_PORT are exported here and reach the tasks through --export=ALL (and
#            the env file). srun needs no ssh, so --no_ssh_check is added. srun places the tasks: put
#            e.g. DS_LAUNCHER_ARGS="--ntasks-per-node=8" to get one task per GPU on every node. A value
#            with a comma cannot go through srun's --export list (NCCL_IB_HCA=mlx5_0,mlx5_1 would
#            arrive as mlx5_0): the env file leaves such lines out (--export=ALL passes them anyway),
#            but DeepSpeed itself adds every NCCL_*/PYTHON*/UCX*/MV2*/MLFLOW* variable to the list, so
#            the script warns about those; put NCCL settings in ~/.nccl.conf instead.
#   mpich, impi  DeepSpeed passes MASTER_ADDR, MASTER_PORT, WORLD_SIZE and the ranks itself (-genv).
# openmpi, mvapich, mpich and impi refuse --num_nodes/--num_gpus: with those backends NUM_NODES and
# GPUS_PER_NODE instead produce a trimmed copy of the hostfile (first NUM_NODES hosts, slots =
# GPUS_PER_NODE) next to the environment file, and the command uses that. These backends put the env
# file's values into mpirun/srun arguments without a shell, so a value DeepSpeed would wrap in
# double quotes (anything but letters, digits and @%+=:,./-) would arrive with the quotes: such lines
# are left out of the file, with a warning. With NO_SSH=1, DeepSpeed ignores the backend and runs its
# per-node launcher on this node only, as with pdsh.
#
# Environment propagation. With ssh/MPI/srun backends the launcher on this node starts the other
# nodes, so variables must be carried explicitly. DeepSpeed (launcher/runner.py) exports every variable
# whose name starts with PYTHON, MLFLOW, MV2, UCX or the accelerator's prefixes (NCCL on CUDA), plus
# every KEY=VALUE line of the file named by $DS_ENV_FILE (default ".deepspeed_env"), looked up in
# $HOME and in the current directory. This script writes such a file with NCCL_*, TORCH_NCCL_*,
# WANDB_*, HF_*, TRANSFORMERS_*, MOETRAIN_*, PYTHONPATH, OMP_NUM_THREADS, CUDA_DEVICE_MAX_CONNECTIONS
# and $DS_ENV_VARS (plus MASTER_ADDR and MASTER_PORT for openmpi, mvapich and slurm), merged after
# the lines of any existing ~/.deepspeed_env and ./.deepspeed_env, and points DS_ENV_FILE at it (an
# absolute path: runner.py joins it onto both directories, which yields the path itself). It goes
# under outputs/ rather than ./.deepspeed_env so the repository root stays clean and a hand-written
# ./.deepspeed_env is never overwritten. DeepSpeed reads the file only when it starts other nodes
# itself, i.e. not with NO_SSH=1, so then none is written: there every node's processes inherit the
# environment of the shell that ran this script on that node. On every node DeepSpeed's per-node
# launcher (pdsh, NO_SSH) sets CUDA_VISIBLE_DEVICES from the hostfile's slots (or --include), replacing
# any value inherited from this shell.
#
# ssh mode requirements: passwordless ssh to every host, pdsh installed, and this repository plus the
# same python/venv at the same absolute path on every node (pdsh runs `cd $PWD; <python> -m
# deepspeed.launcher.launch ...` remotely; mpirun and srun also start `<python>` by this node's path).
# The command runs from the repository root.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/common.sh
source "$REPO_ROOT/scripts/common.sh"

die() {
  echo "train_multinode.sh: $*" >&2
  exit 2
}

parse_launch_args "${BASH_SOURCE[0]}" "$@"

# --- launcher executable and backend -------------------------------------------------------------
DS_BIN="$(venv_tool deepspeed "${DEEPSPEED:-}")"
BACKEND="$(tr '[:upper:]' '[:lower:]' <<<"${DS_LAUNCHER:-pdsh}")"
case "$BACKEND" in
  pdsh | openmpi | mvapich | slurm | mpich | impi) ;;
  *) die "DS_LAUNCHER must be pdsh, openmpi, mvapich, slurm, mpich or impi, not '$DS_LAUNCHER'" ;;
esac
NO_SSH="${NO_SSH:-0}"
if [[ "$NO_SSH" == "1" && "$BACKEND" != "pdsh" ]]; then
  echo "train_multinode.sh: note: NO_SSH=1 starts this node's processes itself; DS_LAUNCHER=$BACKEND is not used" >&2
fi
# backends that start python directly, without DeepSpeed's per-node launcher and without MASTER_*
direct_backend=0
case "$BACKEND" in openmpi | mvapich | slurm) direct_backend=1 ;; esac
# backends that refuse --num_nodes/--num_gpus (a trimmed hostfile stands in for them)
trim_hostfile=0
case "$BACKEND" in openmpi | mvapich | mpich | impi) [[ "$NO_SSH" == "1" ]] || trim_hostfile=1 ;; esac

# --- hostfile ------------------------------------------------------------------------------------
[[ -n "${HOSTFILE:-}" ]] || die "set HOSTFILE (lines like 'node-0 slots=8'; see scripts/hostfile.example)"
if [[ -f "$HOSTFILE" ]]; then
  HOSTFILE="$(cd "$(dirname "$HOSTFILE")" && pwd)/$(basename "$HOSTFILE")"
elif [[ "$DRY_RUN" == "1" ]]; then
  echo "train_multinode.sh: warning: HOSTFILE $HOSTFILE does not exist" >&2
else
  die "HOSTFILE $HOSTFILE does not exist"
fi

# Hosts and their slots in hostfile order (comments and blank lines skipped), as DeepSpeed's
# fetch_hostfile reads them.
hosts=()
host_slots=()
if [[ -f "$HOSTFILE" ]]; then
  while read -r host rest; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    hosts+=("$host")
    slots="$(sed -nE 's/.*slots=([0-9]+).*/\1/p' <<<"$rest")"
    host_slots+=("${slots:-1}")
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
# The processes that openmpi/mvapich/slurm start read these (moetrain's discover_launch_env needs
# MASTER_ADDR once there is more than one process); srun --export=ALL passes them as they are.
export MASTER_ADDR MASTER_PORT

# --- environment file location (the trimmed hostfile goes next to it) ----------------------------
DS_ENV_OUT="${DS_ENV_OUT:-$REPO_ROOT/outputs/launch/deepspeed_env}"
case "$DS_ENV_OUT" in /*) ;; *) DS_ENV_OUT="$PWD/$DS_ENV_OUT" ;; esac
LAUNCH_DIR="$(dirname "$DS_ENV_OUT")"

# openmpi/mvapich/mpich/impi: NUM_NODES / GPUS_PER_NODE become a trimmed hostfile
trimmed_text=""
if [[ "$trim_hostfile" == "1" && (-n "${NUM_NODES:-}" || -n "${GPUS_PER_NODE:-}") ]]; then
  [[ ${#hosts[@]} -gt 0 ]] || die "HOSTFILE $HOSTFILE is needed to apply NUM_NODES/GPUS_PER_NODE for DS_LAUNCHER=$BACKEND"
  n_keep="${NUM_NODES:-${#hosts[@]}}"
  [[ "$n_keep" -le ${#hosts[@]} ]] || die "NUM_NODES=$n_keep but HOSTFILE $HOSTFILE lists ${#hosts[@]} hosts"
  for ((i = 0; i < n_keep; i++)); do
    slots="${host_slots[$i]}"
    if [[ -n "${GPUS_PER_NODE:-}" ]]; then
      [[ "$GPUS_PER_NODE" -le "$slots" ]] || die "GPUS_PER_NODE=$GPUS_PER_NODE but ${hosts[$i]} has slots=$slots"
      slots="$GPUS_PER_NODE"
    fi
    trimmed_text+="${hosts[$i]} slots=$slots"$'\n'
  done
  HOSTFILE="$LAUNCH_DIR/hostfile"
fi

# --- launcher flags ------------------------------------------------------------------------------
ds=("$DS_BIN" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ -z "$trimmed_text" ]]; then
  [[ -n "${NUM_NODES:-}" ]] && ds+=(--num_nodes "$NUM_NODES")
  [[ -n "${GPUS_PER_NODE:-}" ]] && ds+=(--num_gpus "$GPUS_PER_NODE")
fi
if [[ "$NO_SSH" == "1" ]]; then
  [[ -n "${NODE_RANK:-}" ]] || die "NO_SSH=1 needs NODE_RANK (this node's 0-based index in the hostfile)"
  ds+=(--no_ssh --node_rank "$NODE_RANK")
fi
[[ -n "${DS_LAUNCHER:-}" && "$NO_SSH" != "1" ]] && ds+=(--launcher "$BACKEND")
[[ -n "${DS_LAUNCHER_ARGS:-}" ]] && ds+=(--launcher_args "$DS_LAUNCHER_ARGS")
[[ -n "${SSH_PORT:-}" ]] && ds+=(--ssh_port "$SSH_PORT")
# srun starts the tasks itself: DeepSpeed's `ssh <first host> hostname` check would only get in the way
[[ "$BACKEND" == "slurm" && "$NO_SSH" != "1" ]] && ds+=(--no_ssh_check)
if [[ -n "${DS_ARGS:-}" ]]; then
  read -r -a extra_ds <<<"$DS_ARGS"
  ds+=("${extra_ds[@]}")
fi

if [[ -n "${SCRIPT:-}" ]]; then
  ds+=("$(cd "$(dirname "$SCRIPT")" && pwd)/$(basename "$SCRIPT")")
elif [[ "$BACKEND" == "slurm" && "$NO_SSH" != "1" ]]; then
  # DeepSpeed's SlurmRunner drops --module and always runs `python -u <file>`
  ds+=("$REPO_ROOT/scripts/run_module.py" "${MODULE:-moetrain.train}")
else
  ds+=(--module "${MODULE:-moetrain.train}")
fi
cmd=("${ds[@]}" ${args[@]+"${args[@]}"})

# --- environment file ----------------------------------------------------------------------------
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# DeepSpeed splits each line at the first '=' (a line without one crashes it) and pastes the value
# into `export KEY=VALUE;` of a remote shell (pdsh) or into one mpirun/srun argument (-x KEY=VALUE,
# --export=ALL,KEY=VALUE), double-quoting it if it has characters outside [A-Za-z0-9_@%+=:,./-].
# pdsh: values containing '"', '$', '`', '\' or a newline cannot survive that. Other backends: the
# quotes stay in the value, so only values without such characters go through; srun also splits
# its --export list at commas.
env_line_ok() {
  [[ "$1" =~ ^[A-Za-z_][A-Za-z0-9_]*= && "$1" != *[\"\$\`\\]* ]] || return 1
  [[ "$BACKEND" == "pdsh" ]] && return 0
  [[ "${1#*=}" =~ ^[A-Za-z0-9_@%+=:,./-]*$ ]] || return 1
  [[ "$BACKEND" != "slurm" || "${1#*=}" != *,* ]]
}

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
  [[ "$direct_backend" == "1" ]] && extra+=(MASTER_ADDR MASTER_PORT)
  while IFS= read -r name; do names+=("$name"); done < <({ compgen -e; printf '%s\n' ${extra[@]+"${extra[@]}"}; } | sort -u)
  for name in ${names[@]+"${names[@]}"}; do
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    case "$name" in
      NCCL_* | TORCH_NCCL_* | WANDB_* | HF_* | TRANSFORMERS_* | MOETRAIN_* | PYTHONPATH | OMP_NUM_THREADS | \
        CUDA_DEVICE_MAX_CONNECTIONS | HYDRA_FULL_ERROR) ;;
      *) [[ " ${extra[*]} " == *" $name "* ]] || continue ;;
    esac
    [[ -n "${!name+x}" ]] || continue
    line="$name=${!name}"
    if [[ "$line" == *$'\n'* ]] || ! env_line_ok "$line"; then
      if [[ "$BACKEND" == "slurm" ]]; then
        echo "train_multinode.sh: note: $name left out of the environment file (srun --export=ALL passes it)" >&2
      else
        echo "train_multinode.sh: warning: not propagating $name (its value cannot pass DS_LAUNCHER=$BACKEND's exports)" >&2
      fi
      continue
    fi
    printf '%s\n' "$line"
  done
}

if [[ "$BACKEND" == "slurm" && "$NO_SSH" != "1" ]]; then
  # DeepSpeed copies these into srun's comma-separated --export list itself (runner.py EXPORT_ENVS)
  while IFS= read -r name; do
    if [[ "$name" =~ ^(PYTHON|MLFLOW|MV2|UCX|NCCL) && "${!name}" == *,* ]]; then
      echo "train_multinode.sh: warning: $name contains a comma; DeepSpeed's srun --export list will cut it" \
        "at the comma (for NCCL settings use ~/.nccl.conf)" >&2
    fi
  done < <(compgen -e)
fi

cd "$REPO_ROOT"
if [[ "$NO_SSH" == "1" ]]; then
  show_and_run "${cmd[@]}"
fi

# later lines win: DeepSpeed stores the exports in a dict
env_text="$(build_env_file)"
if [[ "$DRY_RUN" == "1" ]]; then
  if [[ -n "$trimmed_text" ]]; then
    echo "# hostfile ($HOSTFILE, not written: dry run)"
    printf '%s' "$trimmed_text"
  fi
  echo "# environment file ($DS_ENV_OUT, not written: dry run)"
  # WANDB_API_KEY and friends stay out of the log
  sed -E 's/^([A-Z_]*(KEY|TOKEN|SECRET|PASSWORD)[A-Z_]*)=.*/\1=<redacted>/' <<<"$env_text"
else
  mkdir -p "$LAUNCH_DIR"
  if [[ -n "$trimmed_text" ]]; then
    printf '%s' "$trimmed_text" >"$HOSTFILE"
    echo "train_multinode.sh: hostfile for DS_LAUNCHER=$BACKEND in $HOSTFILE ($(wc -l <"$HOSTFILE") hosts)"
  fi
  umask 077
  printf '%s\n' "$env_text" | sed '/^$/d' >"$DS_ENV_OUT"
  export DS_ENV_FILE="$DS_ENV_OUT"
  echo "train_multinode.sh: environment for remote nodes in $DS_ENV_FILE ($(wc -l <"$DS_ENV_OUT") variables)"
fi

show_and_run "${cmd[@]}"

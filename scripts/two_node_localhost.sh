#!/usr/bin/env bash
# Simulate a two-node job on one machine: two launcher invocations (node ranks 0 and 1) that meet at
# 127.0.0.1, both in the background. Exits non-zero if either node fails; when one node fails, the
# other is stopped (it would otherwise wait for its peer until the rendezvous/collective timeout).
#
# Usage:
#   scripts/two_node_localhost.sh [--dry-run] [hydra overrides...]
#   scripts/two_node_localhost.sh +experiment=mixtral_tiny parallel.ep_size=2 trainer.max_steps=3
#   SCRIPT=tests/_dist_probe.py scripts/two_node_localhost.sh          # launcher smoke test
#   LAUNCHER=deepspeed scripts/two_node_localhost.sh ...               # via train_multinode.sh NO_SSH=1
#
# Environment:
#   LAUNCHER         torchrun (default: `torchrun --nnodes 2 --node_rank R --nproc_per_node N
#                    --master_addr 127.0.0.1 --master_port P`) or deepspeed (scripts/train_multinode.sh
#                    with NO_SSH=1 NODE_RANK=R and a generated two-line hostfile)
#   NPROC_PER_NODE   processes per simulated node (default 1); world size = 2 * NPROC_PER_NODE
#   MASTER_PORT      rendezvous port (default: a free port)
#   MODULE           python module to launch (default moetrain.train); SCRIPT=path.py launches a file
#   PYTHON           interpreter (default <repo>/.venv/bin/python if present, else python)
#   TIMEOUT_S        kill both nodes after this many seconds (default 0 = no limit); exit status 124
#   LOG_DIR          also keep each node's output in LOG_DIR/node{0,1}.log
#   DRY_RUN=1        print both nodes' commands and exit (same as --dry-run)
#   SPLIT_GPUS       1: give node R the visible GPUs [R*N, (R+1)*N) via CUDA_VISIBLE_DEVICES (default: 1
#                    when at least 2*N GPUs are visible, else 0; without it both nodes would use the same
#                    first N GPUs). Visible GPUs: those `nvidia-smi -L` lists, narrowed to
#                    CUDA_VISIBLE_DEVICES when that is set (CUDA_VISIBLE_DEVICES=4,5,6,7 NPROC_PER_NODE=2:
#                    node0 gets 4,5 and node1 6,7; set but empty: no GPU). With LAUNCHER=deepspeed the
#                    split is passed as `--include 127.0.0.1:IDS@localhost:IDS` (DeepSpeed sets
#                    CUDA_VISIBLE_DEVICES itself), which needs numeric ids
#
# Output lines of each node are prefixed with [node0] / [node1].
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/common.sh
source "$REPO_ROOT/scripts/common.sh"
cd "$REPO_ROOT"

parse_launch_args "${BASH_SOURCE[0]}" "$@"

PY="$(venv_tool python "${PYTHON:-}")"

LAUNCHER="${LAUNCHER:-torchrun}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
TIMEOUT_S="${TIMEOUT_S:-0}"
MASTER_ADDR=127.0.0.1
if [[ -z "${MASTER_PORT:-}" ]]; then
  MASTER_PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "${SCRIPT:-}" ]]; then
  SCRIPT="$(cd "$(dirname "$SCRIPT")" && pwd)/$(basename "$SCRIPT")"
  [[ -f "$SCRIPT" ]] || { echo "two_node_localhost.sh: SCRIPT $SCRIPT not found" >&2; exit 2; }
fi

# GPU ids this script may hand out: nvidia-smi's, narrowed to CUDA_VISIBLE_DEVICES when set.
mapfile -t gpus < <(visible_gpus)
if [[ -z "${SPLIT_GPUS:-}" ]]; then
  SPLIT_GPUS=0
  if [[ ${#gpus[@]} -ge $((2 * NPROC_PER_NODE)) ]]; then SPLIT_GPUS=1; fi
elif [[ "$SPLIT_GPUS" == "1" && ${#gpus[@]} -lt $((2 * NPROC_PER_NODE)) ]]; then
  # no usable list (e.g. no nvidia-smi): plain indices
  mapfile -t gpus < <(seq 0 $((2 * NPROC_PER_NODE - 1)))
fi

# node_gpu_list RANK: the comma-separated GPU ids of simulated node RANK (empty without SPLIT_GPUS)
node_gpu_list() {
  [[ "$SPLIT_GPUS" == "1" ]] || return 0
  local -a ids=("${gpus[@]:$(($1 * NPROC_PER_NODE)):$NPROC_PER_NODE}")
  (IFS=,; echo "${ids[*]}")
}

tmp_dir="$(mktemp -d)"
ds_gpus=()
if [[ "$LAUNCHER" == "deepspeed" ]]; then
  # Two distinct names for the same machine: DeepSpeed keys its resource pool by host name.
  # DeepSpeed's per-node launcher overwrites CUDA_VISIBLE_DEVICES with the node's slot ids from the
  # hostfile, so a split goes through --include (slot ids = GPU ids) instead of the environment.
  slots="$NPROC_PER_NODE"
  if [[ "$SPLIT_GPUS" == "1" ]]; then
    max_id=0
    for g in "${gpus[@]:0:$((2 * NPROC_PER_NODE))}"; do
      [[ "$g" =~ ^[0-9]+$ ]] || {
        echo "two_node_localhost.sh: LAUNCHER=deepspeed needs numeric GPU ids to split, not '$g'" >&2
        exit 2
      }
      if [[ $((10#$g)) -gt $max_id ]]; then max_id=$((10#$g)); fi
    done
    slots=$((max_id + 1))
    ds_gpus=(DS_ARGS="${DS_ARGS:+$DS_ARGS }--include 127.0.0.1:$(node_gpu_list 0)@localhost:$(node_gpu_list 1)")
  else
    ds_gpus=(GPUS_PER_NODE="$NPROC_PER_NODE")
  fi
  printf '127.0.0.1 slots=%s\nlocalhost slots=%s\n' "$slots" "$slots" >"$tmp_dir/hostfile"
fi

node_cmd() { # node_cmd RANK -> fills the global array `cmd`
  local r="$1"
  case "$LAUNCHER" in
    torchrun)
      cmd=("$PY" -m torch.distributed.run --nnodes 2 --node_rank "$r" --nproc_per_node "$NPROC_PER_NODE"
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
      if [[ -n "${SCRIPT:-}" ]]; then cmd+=("$SCRIPT"); else cmd+=(-m "${MODULE:-moetrain.train}"); fi
      ;;
    deepspeed)
      cmd=(env NO_SSH=1 NODE_RANK="$r" HOSTFILE="$tmp_dir/hostfile" MASTER_ADDR="$MASTER_ADDR"
        MASTER_PORT="$MASTER_PORT" "${ds_gpus[@]}" "$REPO_ROOT/scripts/train_multinode.sh")
      ;;
    *)
      echo "two_node_localhost.sh: LAUNCHER must be torchrun or deepspeed, not '$LAUNCHER'" >&2
      exit 2
      ;;
  esac
}

pids=()
# shellcheck disable=SC2317  # invoked by trap
cleanup() {
  local p
  for p in ${pids[@]+"${pids[@]}"}; do
    # each node runs in its own process group (setsid): stop the launcher and its workers
    kill -TERM -- "-$p" 2>/dev/null || true
  done
  rm -rf "$tmp_dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n "${LOG_DIR:-}" ]]; then mkdir -p "$LOG_DIR"; fi

for r in 0 1; do
  node_cmd "$r"
  cmd+=(${args[@]+"${args[@]}"})
  node_env=()
  if [[ "$SPLIT_GPUS" == "1" && "$LAUNCHER" == "torchrun" ]]; then
    node_env=(env CUDA_VISIBLE_DEVICES="$(node_gpu_list "$r")")
  fi
  printf '[node%s] +' "$r"
  printf ' %q' ${node_env[@]+"${node_env[@]}"} "${cmd[@]}"
  printf '\n'
  [[ "$DRY_RUN" == "1" ]] && continue
  if [[ -n "${LOG_DIR:-}" ]]; then
    log="$LOG_DIR/node$r.log"
  else
    log=/dev/null
  fi
  # setsid: a new process group per node, so cleanup() can stop a node's whole process tree.
  # The output filter runs in a process substitution, so $! is the node's own pid.
  setsid ${node_env[@]+"${node_env[@]}"} "${cmd[@]}" \
    > >(sed -u "s/^/[node$r] /" | tee -a "$log") 2>&1 </dev/null &
  pids+=("$!")
done

if [[ "$DRY_RUN" == "1" ]]; then exit 0; fi

start=$SECONDS
status=0
remaining=2
declare -A done_pid=()
while [[ $remaining -gt 0 ]]; do
  sleep 0.2
  for i in 0 1; do
    p="${pids[$i]}"
    [[ -n "${done_pid[$p]:-}" ]] && continue
    if ! kill -0 "$p" 2>/dev/null; then
      rc=0
      wait "$p" || rc=$?
      done_pid[$p]=1
      remaining=$((remaining - 1))
      echo "[node$i] exited with status $rc"
      if [[ $rc -ne 0 && $status -eq 0 ]]; then
        status=$rc
        echo "two_node_localhost.sh: node$i failed; stopping the other node" >&2
        cleanup_other="${pids[$((1 - i))]}"
        kill -TERM -- "-$cleanup_other" 2>/dev/null || true
      fi
    fi
  done
  if [[ "$TIMEOUT_S" -gt 0 && $((SECONDS - start)) -ge "$TIMEOUT_S" && $remaining -gt 0 ]]; then
    echo "two_node_localhost.sh: timeout after ${TIMEOUT_S}s; stopping both nodes" >&2
    for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
    status=124
    break
  fi
done
wait 2>/dev/null || true
pids=()
rm -rf "$tmp_dir"
if [[ $status -eq 0 ]]; then
  echo "two_node_localhost.sh: both nodes finished"
fi
exit "$status"

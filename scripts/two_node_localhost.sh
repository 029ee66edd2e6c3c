#!/usr/bin/env bash
# Simulate a two-node job on one machine: two launcher invocations (node ranks 0 and 1) that meet at
# 127.0.0.1, both in the background. Exits non-zero if either node fails; when one node fails, the
# other is stopped (it would otherwise wait for its peer until the rendezvous/collective timeout).
#
# Usage:
#   scripts/two_node_localhost.sh [hydra overrides...]
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
#   SPLIT_GPUS       1: give node R the GPUs [R*N, (R+1)*N) via CUDA_VISIBLE_DEVICES (default: 1 when
#                    nvidia-smi lists at least 2*N GPUs, else 0; without it both nodes would use GPU 0..N-1)
#
# Output lines of each node are prefixed with [node0] / [node1].
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/common.sh
source "$REPO_ROOT/scripts/common.sh"
cd "$REPO_ROOT"

case "${1:-}" in
  -h | --help)
    print_help "${BASH_SOURCE[0]}"
    exit 0
    ;;
esac

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

if [[ -z "${SPLIT_GPUS:-}" ]]; then
  SPLIT_GPUS=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    n_gpu="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
    if [[ "${n_gpu:-0}" -ge $((2 * NPROC_PER_NODE)) ]]; then SPLIT_GPUS=1; fi
  fi
fi

tmp_dir="$(mktemp -d)"
if [[ "$LAUNCHER" == "deepspeed" ]]; then
  # Two distinct names for the same machine: DeepSpeed keys its resource pool by host name.
  printf '127.0.0.1 slots=%s\nlocalhost slots=%s\n' "$NPROC_PER_NODE" "$NPROC_PER_NODE" >"$tmp_dir/hostfile"
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
        MASTER_PORT="$MASTER_PORT" GPUS_PER_NODE="$NPROC_PER_NODE" "$REPO_ROOT/scripts/train_multinode.sh")
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
  cmd+=("$@")
  node_env=()
  if [[ "$SPLIT_GPUS" == "1" ]]; then
    devs="$(seq -s, $((r * NPROC_PER_NODE)) $(((r + 1) * NPROC_PER_NODE - 1)))"
    node_env=(env CUDA_VISIBLE_DEVICES="$devs")
  fi
  printf '[node%s] +' "$r"
  printf ' %q' ${node_env[@]+"${node_env[@]}"} "${cmd[@]}"
  printf '\n'
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

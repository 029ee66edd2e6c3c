#!/usr/bin/env bash
# Shared by the launch scripts (sourced, never run): help text, --dry-run, and the venv's tools.
set -euo pipefail

# print_help SCRIPT: the script's header comment, up to its `set -euo pipefail` line.
print_help() {
  sed -n '2,/^set -euo/p' "$1" | sed '$d; s/^# \{0,1\}//'
}

# parse_launch_args SCRIPT "$@": sets DRY_RUN (from the environment or --dry-run) and the array
# `args` (everything else, passed through to moetrain.train); -h/--help prints the header and exits.
parse_launch_args() {
  local script="$1"
  shift
  DRY_RUN="${DRY_RUN:-0}"
  args=()
  local a
  for a in "$@"; do
    case "$a" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        print_help "$script"
        exit 0
        ;;
      *) args+=("$a") ;;
    esac
  done
}

# venv_tool NAME [OVERRIDE]: OVERRIDE when set, else <repo>/.venv/bin/NAME when present, else NAME.
venv_tool() {
  if [[ -n "${2:-}" ]]; then
    echo "$2"
  elif [[ -x "$REPO_ROOT/.venv/bin/$1" ]]; then
    echo "$REPO_ROOT/.venv/bin/$1"
  else
    echo "$1"
  fi
}

# show_and_run CMD...: print the command (shell-quoted, after a `+`), then exec it unless DRY_RUN=1.
show_and_run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" == "1" ]]; then
    exit 0
  fi
  exec "$@"
}

# visible_gpus: the GPU ids this process may use, one per line, as CUDA numbers them for it. Without
# a working `nvidia-smi -L` there are none. Otherwise, with CUDA_VISIBLE_DEVICES unset, every GPU that
# nvidia-smi lists (0..n-1: nvidia-smi ignores CUDA_VISIBLE_DEVICES); with it set, its comma-separated
# entries, read the way CUDA reads them: an empty value means no GPU, and the list ends at the first
# entry that names no GPU here (empty, negative such as -1, an index >= n, or not a number/UUID).
visible_gpus() {
  local n=0 listing
  if command -v nvidia-smi >/dev/null 2>&1 && listing="$(nvidia-smi -L 2>/dev/null)"; then
    n="$(grep -c '^GPU ' <<<"$listing" || true)"
  fi
  [[ "${n:-0}" -gt 0 ]] || return 0
  if [[ -z "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    seq 0 $((n - 1))
    return 0
  fi
  local -a entries=()
  local e
  IFS=, read -r -a entries <<<"$CUDA_VISIBLE_DEVICES"
  for e in ${entries[@]+"${entries[@]}"}; do
    e="${e//[[:space:]]/}"
    if [[ "$e" =~ ^[0-9]+$ ]]; then
      [[ $((10#$e)) -lt "$n" ]] || break
    elif [[ ! "$e" =~ ^(GPU|MIG)- ]]; then
      break
    fi
    echo "$e"
  done
}

# visible_gpu_count: how many GPUs visible_gpus lists.
visible_gpu_count() {
  local -a gpus=()
  mapfile -t gpus < <(visible_gpus)
  echo "${#gpus[@]}"
}

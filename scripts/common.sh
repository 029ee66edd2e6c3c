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

# shellcheck shell=bash
# Sourced by the experiment launchers (c100_rn18.sh, ...): `launch CONFIG...` expands each config's sweep
# with `python -m shared.sweep` and, depending on LAUNCH, prints, runs or submits its runs.
#
# Environment (all optional):
#   LAUNCH         dry-run (default: print the commands) | local (run them one after another here) |
#                  slurm (one SLURM job array per config) | list (write command lists to $OUTPUT_DIR/lists)
#   DATA_DIR       dataset root (default: <repo>/data)
#   OUTPUT_DIR     where run directories go (default: <repo>/output)
#   WANDB_PROJECT  wandb project (default: ghost-noise)
#   PYTHON         interpreter with the project installed (default: <repo>/.venv/bin/python if present, else python3)
#   GPUS_PER_TASK  GPUs per node and run; > 1 runs train.py under torchrun (default: 1)
#   NODES          nodes per run (slurm; default 1): one torchrun per node, c10d rendezvous
#   ARRAY_THROTTLE at most this many array tasks at once (slurm: --array=0-N%THROTTLE; default: no limit)
#   SBATCH_ARGS    extra sbatch options, e.g. "--partition=gpu --time=24:00:00 --cpus-per-task=8"
#                  (slurm: the job is named CONFIGDIR-CONFIG, logs go to $OUTPUT_DIR/slurm/NAME-%A_%a.out,
#                  and it asks for --nodes=$NODES --gres=gpu:$GPUS_PER_TASK; SBATCH_ARGS come later and win;
#                  CPU-only on purpose: SBATCH_ARGS="--gres=none" and ALLOW_CPU=1, else GPU runs are refused)
#   SWEEP_ARGS     extra shared.sweep options, split at whitespace (no quoting), e.g. "--only *gni16* --set workers=8"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON
DATA_DIR="${DATA_DIR:-$REPO_ROOT/data}"
OUTPUT_DIR="${OUTPUT_DIR:-$REPO_ROOT/output}"
WANDB_PROJECT="${WANDB_PROJECT:-ghost-noise}"
LAUNCH="${LAUNCH:-dry-run}"
GPUS_PER_TASK="${GPUS_PER_TASK:-1}"
NODES="${NODES:-1}"
export GPUS_PER_TASK

launch() {
  local config count name array failed=0
  local -a sweep_args sbatch_args
  read -r -a sweep_args <<< "${SWEEP_ARGS:-}"
  read -r -a sbatch_args <<< "${SBATCH_ARGS:-}"
  sweep_args+=(--set "data_dir=$DATA_DIR" --set "output=$OUTPUT_DIR" --set "wandb_project=$WANDB_PROJECT")
  cd "$REPO_ROOT"
  for config in "$@"; do
    case "$LAUNCH" in
      dry-run)
        "$PYTHON" -m shared.sweep "$config" --dry-run "${sweep_args[@]}"
        ;;
      local)
        "$PYTHON" -m shared.sweep "$config" --run "${sweep_args[@]}" || failed=$?
        ;;
      list)
        mkdir -p "$OUTPUT_DIR/lists"
        "$PYTHON" -m shared.sweep "$config" "${sweep_args[@]}" \
          --write-list "$OUTPUT_DIR/lists/$(basename "$(dirname "$config")")_$(basename "$config" .yaml).txt"
        ;;
      slurm)
        count="$("$PYTHON" -m shared.sweep "$config" --count "${sweep_args[@]}")"
        name="$(basename "$(dirname "$config")")-$(basename "$config" .yaml)"
        array="0-$((count - 1))${ARRAY_THROTTLE:+%$ARRAY_THROTTLE}"
        mkdir -p "$OUTPUT_DIR/slurm"
        echo "submitting $config: $count runs as job array $name ($array), logs in $OUTPUT_DIR/slurm"
        sbatch --job-name="$name" --array="$array" --output="$OUTPUT_DIR/slurm/%x-%A_%a.out" \
          --nodes="$NODES" --gres="gpu:$GPUS_PER_TASK" "${sbatch_args[@]}" \
          "$REPO_ROOT/experiment_scripts/slurm_array.sbatch" "$config" "${sweep_args[@]}"
        ;;
      *)
        echo "LAUNCH must be dry-run, local, slurm or list, got '$LAUNCH'" >&2
        return 2
        ;;
    esac
  done
  return "$failed"
}

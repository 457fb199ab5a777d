#!/usr/bin/env bash
# CIFAR-100 ResNet-18 (paper Table 1 and Figure 3).
#   experiment_scripts/c100_rn18.sh [test|sweeps|all]       (default: all)
#   test:   configs/c100_rn18/test_all.yaml (24 runs), test_ln.yaml (12 runs)
#   sweeps: configs/c100_rn18/sweep_*.yaml (90/10 validation split; 547 runs in all)
# LAUNCH=dry-run|local|slurm|list and the paths come from the environment: see _launch.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

what="${1:-all}"
tests=(configs/c100_rn18/test_all.yaml configs/c100_rn18/test_ln.yaml)
sweeps=()
for config in "$REPO_ROOT"/configs/c100_rn18/sweep_*.yaml; do
  sweeps+=("configs/c100_rn18/$(basename "$config")")
done
case "$what" in
  test) launch "${tests[@]}" ;;
  sweeps) launch "${sweeps[@]}" ;;
  all) launch "${tests[@]}" "${sweeps[@]}" ;;
  *) echo "usage: $0 [test|sweeps|all]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# CIFAR-10 Simple ViT, ConvMixer and NF-ResNet-26, with and without augmentation, baseline vs GNI,
# 3 seeds (6 runs per config, 36 in all).
#   experiment_scripts/c10_other_archs.sh [svit|cvmx|nfrn|all]   (default: all)
# LAUNCH=dry-run|local|slurm|list and the paths come from the environment: see _launch.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

what="${1:-all}"
case "$what" in
  svit|cvmx|nfrn) archs=("$what") ;;
  all) archs=(svit cvmx nfrn) ;;
  *) echo "usage: $0 [svit|cvmx|nfrn|all]" >&2; exit 2 ;;
esac
configs=()
for arch in "${archs[@]}"; do
  configs+=("configs/c10_$arch/aug.yaml" "configs/c10_$arch/noaug.yaml")
done
launch "${configs[@]}"

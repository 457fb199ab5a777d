#!/usr/bin/env bash
# ImageNet-1k ResNet-50 (paper Table 2): BN (3 seeds), GBN 16/32/64 by gradient accumulation, GNI
# 16/32/64 (9 runs). DATA_DIR must hold the ImageFolder layout DATA_DIR/train/<class>/*.JPEG and
# DATA_DIR/val/<class>/*.JPEG. One GPU per run as in the paper; GPUS_PER_TASK=G splits each batch of 256
# over G GPUs (GBN/GNI then act on each GPU's share: keep the per-GPU batch a multiple of N).
# LAUNCH=dry-run|local|slurm|list and the paths come from the environment: see _launch.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
launch configs/i1k_rn50/bn.yaml configs/i1k_rn50/gbn_accum.yaml configs/i1k_rn50/gni.yaml

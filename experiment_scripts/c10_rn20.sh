#!/usr/bin/env bash
# CIFAR-10 ResNet-20 (paper Table 2): BN, GBN and GNI at N = 16, 32, 64, 3 seeds (21 runs).
# LAUNCH=dry-run|local|slurm|list and the paths come from the environment: see _launch.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
launch configs/c10_rn20/test_all.yaml

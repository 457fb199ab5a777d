#!/usr/bin/env bash
# A real-data check that fits a 2-core CPU: ResNet-20 on 2,560 CIFAR-10 training images for 40 epochs,
# BN vs GBN-16 vs GNI-16, and LayerNorm-style ResNet-20 (weight-standardized convs with the reference's fan-in
# scaling + GroupNorm(1)) without and with GNI-16, 3 seeds each (15 runs, about 7 minutes each on 2 idle
# cores), then the report table. ONLY=GLOB runs a subset (e.g. ONLY='*wsfan*' for the 6 LayerNorm runs).
#
#   DATA_DIR=/path/to/cifar10 experiment_scripts/cpu_c10_real_data.sh
#
# DATA_DIR is an ImageFolder directory with train/ and test/ (e.g. `tar xzf cifar10-jpeg.tar.gz -C DIR`).
# OUTPUT_DIR (default <repo>/output/cpu_c10_real_data) receives the runs and report/; runs that are
# finished are skipped and interrupted ones resume, so the script can simply be started again.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
: "${DATA_DIR:?set DATA_DIR to an ImageFolder directory holding train/ and test/}"
OUTPUT_DIR="${OUTPUT_DIR:-$REPO_ROOT/output/cpu_c10_real_data}"
cd "$REPO_ROOT"
"$PYTHON" -m shared.sweep configs/cpu_c10_rn20/real_data.yaml --run ${ONLY:+--only "$ONLY"} \
  --set "data_dir=$DATA_DIR" --set "output=$OUTPUT_DIR"
"$PYTHON" -m shared.report "$OUTPUT_DIR" --out "$OUTPUT_DIR/report"

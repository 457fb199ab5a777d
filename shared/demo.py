"""``make run``: train a ResNet-20 with BN and with GNI-16 on the embedded digits dataset and compare.

The digits (scikit-learn's bundled 8x8 handwritten digits, 1,500 train / 297 test images, upsampled to
16x16) ship inside a dependency, so this runs offline on any machine, in about a minute on 2 CPU
cores. It runs ``python train.py`` twice, as a user would, with the same seed (so the same
initialization and data order), and prints the two results side by side. Both runs land in ``OUTPUT/demo-bn`` and
``OUTPUT/demo-gni16``; a second ``make run`` starts them afresh.

    python -m shared.demo [--epochs 8] [--output output] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

TRAIN_PY = Path(__file__).resolve().parent.parent / "train.py"
NORMS = ("bn", "gni16")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--output", default="output")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    results = {}
    for norm in NORMS:
        name = f"demo-{norm}"
        shutil.rmtree(Path(options.output) / name, ignore_errors=True)
        print(f"\n=== {name}: cifar_resnet20 with norm {norm} on digits, {options.epochs} epochs ===", flush=True)
        started = time.time()
        # as a user runs it: its own process, printing to this terminal
        code = subprocess.call([
            sys.executable, str(TRAIN_PY), "--dataset", "digits", "--model", "cifar_resnet20", "--norm", norm,
            "-b", "64", "--lr", "0.1", "--weight-decay", "5e-4", "--epochs", str(options.epochs),
            "--warmup-epochs", "1", "--sched-on-updates", "--smoothing", "0", "--seed", str(options.seed),
            "--checkpoint-hist", "0", "--log-interval", "1000", "--output", options.output, "--experiment", name])
        if code != 0:
            print(f"{name} failed with exit code {code}", file=sys.stderr)
            return code
        results[norm] = json.loads((Path(options.output) / name / "results.json").read_text())
        results[norm]["seconds"] = time.time() - started

    print("\nBN vs GNI-16 on digits (ResNet-20, batch 64, same seed; test set of 297 images)")
    print(f"{'norm':<8} {'final top1 %':>12} {'best top1 %':>12} {'final train loss':>17} {'time s':>7}")
    for norm, result in results.items():
        final, best = result["final"], result["best"]
        print(f"{norm:<8} {final['eval_top1']:>12.2f} {best['eval_top1']:>12.2f} {final['train_loss']:>17.4f} "
              f"{result['seconds']:>7.1f}")
    print("One seed on a tiny dataset: a smoke test of the harness, not evidence for either method "
          "(see the README's real-data table).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

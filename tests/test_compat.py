"""Supported versions: the project imports and trains without wandb when logging is off. Run under the
oldest supported torch by `make test-compat` (its own venv, no wandb there), and here with wandb hidden
by an import blocker in a fresh process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A meta-path finder that refuses wandb, installed before anything else is imported.
BLOCK_WANDB = """
import importlib.abc, sys
class _NoWandb(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, _NoWandb())
"""

# One short run per layer kind: fused GNI, GBN, XBN, NoisyAffine, and dropout (flexible_dropout blocks).
TRAIN_EACH_KIND = """
import json, sys
out = sys.argv[1]
try:
    import wandb
    print(json.dumps({"wandb": "importable"}))
    sys.exit(1)
except ImportError:
    pass
import train
base = ["--dataset", "digits", "--model", "cifar_resnet20", "-b", "32", "--lr", "0.05", "--epochs", "1",
        "--warmup-epochs", "0", "-j", "0", "--train-split", "train[:64]-0", "--val-split", "test[:32]",
        "--checkpoint-hist", "0", "--device", "cpu", "--output", out]
kinds = {"gni4": ["--norm", "gni4"], "gbn16": ["--norm", "gbn16"], "xbn16": ["--norm", "xbn16"],
         "nat4": ["--norm", "nat4"],
         "dropout": ["--norm", "bn", "--model-kwargs",
                     "block_dropout={'subtype': 'flexible_dropout', 'kind': 'gaussian', 'p': 0.2}"]}
codes = {name: train.main(base + ["--experiment", name] + flags) for name, flags in kinds.items()}
print(json.dumps({"codes": codes, "wandb_loaded": "wandb" in sys.modules}))
"""


@pytest.mark.slow
def test_every_layer_kind_trains_without_wandb(tmp_path):
    script = tmp_path / "train_each.py"
    script.write_text(BLOCK_WANDB + TRAIN_EACH_KIND)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "runs")], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                          "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"codes": dict.fromkeys(["gni4", "gbn16", "xbn16", "nat4", "dropout"], 0),
                      "wandb_loaded": False}
    for name in report["codes"]:
        results = json.loads((tmp_path / "runs" / name / "results.json").read_text())
        assert results["status"] == "finished" and results["num_updates"] == 2


def test_the_import_blocker_does_hide_wandb(tmp_path):
    """Negative control for the test above: the blocker makes `import wandb` fail in that process."""
    script = tmp_path / "probe.py"
    script.write_text(BLOCK_WANDB + "import wandb\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "blocked by the test" in result.stderr

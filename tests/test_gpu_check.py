"""bench.gpu_check (`make gpu-check`): without a GPU it refuses in one line; its CPU smoke mode runs every
stage that does not need CUDA (pytest subset, bench, the bf16/channels_last/compile step timings, three
concurrent train.py runs on an ImageFolder archive) and writes the Markdown + JSON report."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _tiny_imagefolder_archive(path: Path) -> Path:
    """10 classes x (4 train, 2 test) 8x8 PNG images, under a top folder as the real archive has."""
    from PIL import Image

    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", 4), ("test", 2)):
            for label in range(10):
                for number in range(count):
                    buffer = io.BytesIO()
                    Image.new("RGB", (8, 8), (label * 25, number * 60, 128)).save(buffer, format="PNG")
                    info = tarfile.TarInfo(f"cifar10/{split}/class{label}/{number}.png")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)
    return path


def test_without_a_gpu_it_exits_nonzero_with_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "gpu-check: no CUDA device here" in result.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_unknown_stage_is_a_usage_error(tmp_path, capsys):
    from bench import gpu_check

    assert gpu_check.main(["--smoke", "--stages", "tests,benchmark", "--out", str(tmp_path)]) == 2
    assert "unknown stage 'benchmark'; valid: tests, bench, step, cifar" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_mode_runs_every_stage_and_writes_the_report(tmp_path):
    archive = _tiny_imagefolder_archive(tmp_path / "tiny.tar.gz")
    out = tmp_path / "report"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--data", str(archive),
                             "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + json.dumps(report)[-3000:]
    stages = report["stages"]
    assert list(stages) == ["tests", "bench", "step", "cifar"]
    assert all(stage["status"] == "ok" for stage in stages.values())
    assert stages["tests"]["counts"]["passed"] > 0 and "failed" not in stages["tests"]["counts"]
    assert "| layers" in stages["bench"]["table"] and "| step" in stages["bench"]["table"]
    assert len(stages["step"]["rows"]) == 3  # float32, bf16 channels_last, + compile
    for row in stages["step"]["rows"].values():
        assert row["bn"]["ratio"] == 1.0 and row["gni16"]["ms"] > 0 and row["gbn16"]["ms"] > 0
    runs = stages["cifar"]["runs"]
    assert sorted(runs) == ["bn", "gbn16", "gni16"]
    for run in runs.values():
        assert run["status"] == "finished" and run["epochs_done"] == 1 and run["images_per_s"] > 0
    # 40 training images: the archive was unpacked and read as an ImageFolder
    assert sum(1 for p in (out / "cifar10" / "cifar10" / "train").rglob("*.png")) == 40
    markdown = (out / "gpu_check.md").read_text()
    assert "## cifar: ok" in markdown and "| gni16 | finished |" in markdown and "## step: ok" in markdown


def test_data_path_ratio_reads_the_bench_row_and_sums_the_three_runs():
    from bench import gpu_check

    table = ("| section | case | layout | median | unit | ratio |\n"
             "| data    | torchvision DataLoader cifar | contiguous | 900.0 | img/s | 1.0 |\n"
             "| data    | DeviceImageLoader cifar | contiguous | 30000.0 | img/s | 33.3 |\n")
    runs = {"bn": {"images_per_s": 6000}, "gbn16": {"images_per_s": 5000}, "gni16": {"images_per_s": 4000}}
    ratio = gpu_check.data_path_ratio({"bench": {"table": table}, "cifar": {"runs": runs}})
    assert ratio == {"bench_img_s": 30000.0, "train_py_img_s": 15000, "ratio": 2.0, "target": 2.0}
    assert gpu_check.data_path_ratio({"bench": {"table": table}}) is None  # no CIFAR runs: no figure

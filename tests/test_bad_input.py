"""Bad input to train.py: exit code 2 and a message that names the offending value and what is valid.

One table row per case: ``(case id, extra arguments, substrings the error message must contain)``.
Arguments may use ``{tmp}`` (a directory of prepared bad files and folders) and ``{ckpt}`` (a real
checkpoint of a one-epoch cifar_resnet20 run). train.main runs in-process (no interpreter start-up).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

import train

torch.set_num_threads(1)

BASE = ["--dataset", "digits", "--model", "cifar_resnet20", "-b", "64", "--epochs", "1", "--warmup-epochs", "0",
        "--lr", "0.1", "-j", "0", "--train-split", "train[:64]-0", "--val-split", "test[:64]"]
FOLDER = ["--dataset", "imagefolder", "--train-split", "train", "--val-split", "val", "--input-size", "3", "8", "8"]

CASES = [
    # model
    ("unknown-model", ["--model", "cifar_resnet2"], ["'cifar_resnet2'", "did you mean", "cifar_resnet20"]),
    ("model-kwarg", ["--model-kwargs", "foo=1"], ["foo", "unexpected keyword"]),
    # norm specs
    ("norm-subtype", ["--norm", "gbm16"], ["'gbm'", "did you mean 'gbn'", "valid:", "gbn2d"]),
    ("norm-timm-name", ["--norm", "groupnrm"], ["'groupnrm'", "did you mean 'groupnorm'"]),
    ("norm-keyword", ["--norm", '{"subtype": "gbn2d", "ghost_batchsize": 16}'],
     ["'ghost_batchsize'", "did you mean 'ghost_batch_size'", "valid: affine"]),
    ("norm-json", ["--norm", '{"subtype": "gbn2d", '], ["malformed spec", "JSON error at line 1, column"]),
    ("norm-yaml", ["--norm", "[gbn16, ]]"], ["malformed spec", "YAML error at line 1"]),
    ("norm-number-float", ["--norm", "gbn16.5"], ["'gbn16.5'", "did you mean 'gbn'"]),
    ("ghost-zero", ["--norm", "gbn0"], ["ghost_batch_size must be an int >= 1", "got 0"]),
    ("ghost-negative", ["--norm", '{"subtype": "gbn2d", "ghost_batch_size": -4}'], [">= 1", "got -4"]),
    ("ghost-float", ["--norm", '{"subtype": "gbn2d", "ghost_batch_size": 2.5}'], ["int >= 1", "2.5", "float"]),
    ("ghost-string", ["--norm", '{"subtype": "gbn2d", "ghost_batch_size": "x"}'], ["int >= 1", "'x'", "str"]),
    ("xbn-one", ["--norm", "xbn1"], ["xbn2d", "int >= 2", "got 1"]),
    ("nat-one", ["--norm", "nat1"], ["nat", "int >= 2", "degrees of freedom", "got 1"]),
    ("gbn-larger-than-batch", ["--norm", "gbn128"], ["ghost_batch_size 128", "GhostBatchNorm2d", "--batch-size 64",
                                                     "at most 64"]),
    ("xbn-larger-than-batch", ["--norm", "xbn128"], ["ghost_batch_size 128", "ExclusiveBatchNorm2d", "at most 64"]),
    # config files
    ("yaml-unknown-key", ["-c", "{tmp}/unknown.yaml"], ["line 2", "unknown key 'lrr'", "did you mean 'lr'"]),
    ("yaml-syntax", ["-c", "{tmp}/syntax.yaml"], ["YAML syntax error", "syntax.yaml", "line 2"]),
    ("config-missing", ["-c", "{tmp}/nope.yaml"], ["nope.yaml", "does not exist"]),
    # data
    ("unknown-dataset", ["--dataset", "digitz"], ["'digitz'", "did you mean 'digits'", "valid:"]),
    ("data-dir-missing", FOLDER + ["--data-dir", "{tmp}/nope"], ["nope", "does not exist or is not a directory"]),
    ("data-dir-is-file", FOLDER + ["--data-dir", "{tmp}/afile"], ["afile", "not a directory"]),
    ("data-dir-empty", FOLDER + ["--data-dir", "{tmp}/empty"], ["no folder 'train'", "its folders: none"]),
    ("class-without-images", FOLDER + ["--data-dir", "{tmp}/noimg"], ["classes b", "Supported extensions"]),
    ("corrupt-image", FOLDER + ["--data-dir", "{tmp}/corrupt"], ["x.png", "corrupt"]),
    ("split-unparsable", ["--train-split", "train[:abc]-0"], ["'abc'", "fraction", "sample count"]),
    ("split-empty-count", ["--train-split", "train[:0]-0"], ["'train[:0]-0' is empty", "of 1500 samples"]),
    ("split-empty-fraction", ["--train-split", "train[0.5:0.5]-0"], ["is empty", "750:750"]),
    ("split-name", ["--train-split", "trian"], ["'trian'", "'train' and 'test'"]),
    # checkpoints and run directories
    ("checkpoint-missing", ["--resume", "{tmp}/none.pth.tar"], ["none.pth.tar", "no such checkpoint", "--resume auto"]),
    ("checkpoint-truncated", ["--resume", "{tmp}/half.pth.tar"], ["half.pth.tar", "cannot be read",
                                                                  "truncated or corrupt"]),
    ("checkpoint-garbage", ["--resume", "{tmp}/garbage.pth.tar"], ["garbage.pth.tar", "cannot be read"]),
    ("checkpoint-other-architecture", ["--model", "cifar_resnet18", "--resume", "{ckpt}", "--resume-allow-changes"],
     ["does not fit --model cifar_resnet18", "size mismatch for", "fc.weight"]),
    ("run-dir-taken", ["--output", "{ckpt_root}", "--experiment", "base"], ["already holds a run", "--resume auto"]),
    ("resume-auto-unnamed", ["--resume", "auto", "--experiment", ""], ["--resume auto", "--experiment"]),
    ("output-under-file", ["--output", "{tmp}/afile/sub"], ["afile/sub", "cannot be written", "Not a directory"]),
    # numbers and choices
    ("lr-zero", ["--lr", "0"], ["--lr must be positive", "got 0.0"]),
    ("lr-negative", ["--lr", "-1"], ["--lr must be positive", "got -1.0"]),
    ("epochs-zero", ["--epochs", "0"], ["--epochs must be a positive integer", "got 0"]),
    ("batch-zero", ["-b", "0"], ["--batch-size must be a positive integer", "got 0"]),
    ("batch-negative", ["-b", "-3"], ["--batch-size must be a positive integer", "got -3"]),
    ("batch-float", ["-b", "6.4"], ["--batch-size", "invalid int value: '6.4'"]),
    ("grad-accum-zero", ["--grad-accum-steps", "0"], ["--grad-accum-steps must be a positive integer", "got 0"]),
    ("smoothing", ["--smoothing", "1.5"], ["--smoothing must be in [0, 1)", "1.5"]),
    ("nonfinite-choice", ["--nonfinite", "ignore"], ["'ignore'", "stop, skip"]),
    ("amp-dtype-choice", ["--amp-dtype", "fp8"], ["'fp8'", "float16, bfloat16"]),
]


def _fill(text: str, files: dict) -> str:
    for key, value in files.items():
        text = text.replace("{" + key + "}", value)
    return text


def _image(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bad_input")
    (tmp / "unknown.yaml").write_text("epochs: 3\nlrr: 0.1\n")
    (tmp / "syntax.yaml").write_text("epochs: 3\n  lr: [0.1\n")
    (tmp / "afile").write_text("not a directory\n")
    (tmp / "empty").mkdir()
    for split in ("train", "val"):
        _image(tmp / "noimg" / split / "a" / "x.png")
        (tmp / "noimg" / split / "b").mkdir()
        for name in "ab":
            (tmp / "corrupt" / split / name).mkdir(parents=True)
            (tmp / "corrupt" / split / name / "x.png").write_bytes(b"this is not an image")
    (tmp / "garbage.pth.tar").write_bytes(bytes(range(256)) * 4)
    # a real checkpoint, and its first half (what a non-atomic writer leaves when killed)
    root = tmp / "runs"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert train.main(BASE + ["--norm", "gni16", "--output", str(root), "--experiment", "base"]) == 0
    ckpt = root / "base" / "last.pth.tar"
    data = ckpt.read_bytes()
    (tmp / "half.pth.tar").write_bytes(data[:len(data) // 2])
    return {"tmp": str(tmp), "ckpt": str(ckpt), "ckpt_root": str(root)}


def test_table_is_large_and_unique():
    assert len(CASES) >= 30
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id, extra, expected", CASES, ids=[case[0] for case in CASES])
def test_bad_input(case_id, extra, expected, files, tmp_path):
    argv = BASE + ["--norm", "gni16", "--output", str(tmp_path / "out"), "--experiment", case_id]
    argv += [_fill(arg, files) for arg in extra]
    expected = [_fill(text, files) for text in expected]
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            code = train.main(argv)
        except SystemExit as exit_:  # argparse's own errors (type and choice checks)
            code = exit_.code
    message = stderr.getvalue()
    assert code == 2, f"exit {code}; stderr:\n{message}\nstdout:\n{stdout.getvalue()[-2000:]}"
    assert "Traceback" not in message
    for text in expected:
        assert text in message, f"{text!r} not in the message:\n{message}"


def test_ghost_noise_accepts_ghost_batch_larger_than_batch():
    """GNI samples its ghost batches with replacement: N > batch size is valid (no error), unlike GBN/XBN."""
    from shared import create_model

    train.check_ghost_batches(create_model("cifar_resnet20", norm="gni128", num_classes=10), 64)
    train.check_ghost_batches(create_model("cifar_resnet20", norm="nat128", num_classes=10), 64)
    train.check_ghost_batches(create_model("cifar_resnet20", norm="gbn64", num_classes=10), 64)
    with pytest.raises(train.UsageError, match="at most 64"):
        train.check_ghost_batches(create_model("cifar_resnet20", norm="gbn65", num_classes=10), 64)

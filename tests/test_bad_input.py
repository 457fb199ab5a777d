"""Bad input to train.py: exit code 2 and a message that names the offending value and what is valid.

One table row per case: ``(case id, extra arguments, substrings the error message must contain)``.
Arguments may use ``{tmp}`` (a directory of prepared bad files and folders) and ``{ckpt}`` (a real
checkpoint of a one-epoch cifar_resnet20 run). train.main runs in-process (no interpreter start-up).
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
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
    ("nonfinite-choice", ["--nonfinite", "ignore"], ["'ignore'", "stop", "skip"]),
    # issue 10: bounded inputs
    ("lr-infinite", ["--lr", "inf"], ["--lr must be a finite number", "got inf"]),
    ("lr-huge", ["--lr", "1e6"], ["--lr must be positive and at most 100", "got 1000000.0"]),
    ("weight-decay-nan", ["--weight-decay", "nan"], ["--weight-decay must be a finite number", "got nan"]),
    ("weight-decay-negative", ["--weight-decay", "-0.1"], ["--weight-decay must be in [0, 10]", "got -0.1"]),
    ("momentum-one", ["--momentum", "1"], ["--momentum must be in [0, 1)", "got 1.0"]),
    ("clip-grad-zero", ["--clip-grad", "0"], ["--clip-grad must be positive", "got 0.0"]),
    ("mean-infinite", ["--mean", "0.5", "inf", "0.5"], ["--mean must be a finite number", "inf"]),
    ("ghost-noise-huge", ["--norm", "gni1000000000"], ["ghost_batch_size 1000000000", "index tensor",
                                                       "--batch-size 64", "N at most 1048576"]),
    ("yaml-alias-bomb", ["-c", "{tmp}/bomb.yaml"], ["bomb.yaml, line", "expands to more than 100000 values",
                                                   "aliases"]),
    ("yaml-recursive-alias", ["-c", "{tmp}/recursive.yaml"], ["recursive.yaml, line 1", "refers to itself"]),
    ("yaml-deep", ["-c", "{tmp}/deep.yaml"], ["deep.yaml", "nested more than 32 levels"]),
    ("yaml-deep-spec-string", ["-c", "{tmp}/deep_spec.yaml"], ["deep_spec.yaml", "norm", "nested more than 32"]),
    ("norm-deep", ["--norm", "[" * 2000 + "]" * 2000], ["--norm", "nested more than 32 levels"]),
    # issue 10: run directories
    ("experiment-parent", ["--experiment", "../../escaped"], ["--experiment '../../escaped'", "inside --output"]),
    ("experiment-absolute", ["--experiment", "/tmp/escaped"], ["--experiment '/tmp/escaped'", "inside --output"]),
    ("experiment-dot", ["--experiment", "."], ["--experiment '.'", "inside --output"]),
    ("run-dir-locked", ["--output", "{tmp}", "--experiment", "locked"], ["is in use by another run", "pid",
                                                                         "choose another --experiment"]),
    ("results-without-checkpoint", ["--output", "{tmp}", "--experiment", "finished", "--resume", "auto"],
     ["already holds a run (args.yaml, summary.csv, results.json", "no last.pth.tar", "--start-fresh"]),
    # issue 10: data
    ("classes-differ", FOLDER + ["--data-dir", "{tmp}/classes"], ["different classes",
                                                                 "only in the evaluation split: 'c'"]),
    ("odd-image-strict", FOLDER + ["--data-dir", "{tmp}/oddsize", "--data-strict", "-b", "2"], ["1 other size", "big.png",
                                                                                     "--data-strict"]),
    ("amp-dtype-choice", ["--amp-dtype", "fp8"], ["'fp8'", "float16", "bfloat16"]),
]


def _fill(text: str, files: dict) -> str:
    for key, value in files.items():
        text = text.replace("{" + key + "}", value)
    return text


def _image(path: Path, size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(path)


_HELD_LOCKS: list = []


def _bad_yaml(tmp: Path) -> None:
    """A real alias bomb (9 levels of 9 aliases: 9^9 strings once expanded), deep nesting, a self-reference."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (tmp / "bomb.yaml").write_text("\n".join(lines) + "\n")
    (tmp / "recursive.yaml").write_text("norm: &n [gbn16, *n]\n")
    (tmp / "deep.yaml").write_text("model_kwargs: " + "{a: " * 200 + "1" + "}" * 200 + "\n")
    (tmp / "deep_spec.yaml").write_text("norm: '" + "[" * 3000 + "]" * 3000 + "'\n")


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
    _bad_yaml(tmp)
    for split, classes in (("train", "ab"), ("val", "ac")):
        for name in classes:
            _image(tmp / "classes" / split / name / "x.png")
    for split in ("train", "val"):
        for name in "ab":
            _image(tmp / "oddsize" / split / name / "x.png")
    _image(tmp / "oddsize" / "train" / "a" / "big.png", size=9)  # sorts first: the common 8x8 must still win
    _image(tmp / "oddsize" / "train" / "b" / "y.png")
    (tmp / "finished").mkdir()
    for name in ("args.yaml", "summary.csv", "results.json"):  # a finished run whose last.pth.tar is gone
        (tmp / "finished" / name).write_text("seed: 1\n")
    from shared.run_files import RunLock

    (tmp / "locked").mkdir()
    _HELD_LOCKS.append(RunLock(tmp / "locked"))  # another "run" (this process, another open file) holds it
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


# ---------------------------------------------------------------------------------------------- other entry points

def _run_entry(main, argv) -> tuple:
    """``main(argv)`` in-process: (exit code, stderr); argparse's own errors count by their exit code."""
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, stderr.getvalue()


SWEEP_CASES = [
    ("config-missing", ["{tmp}/nope.yaml"], ["nope.yaml", "does not exist"]),
    ("alias-bomb", ["{tmp}/bomb.yaml"], ["bomb.yaml, line", "expands to more than"]),
    ("deep", ["{tmp}/deep.yaml"], ["nested more than 32 levels"]),
    ("newline-in-list", ["{tmp}/sweep.yaml", "--set", 'wandb_name="a\\nb"', "--write-list", "{out}/runs.txt"],
     ["run 0", "holds a line break", "cannot be one line"]),
    ("list-unwritable", ["{tmp}/sweep.yaml", "--write-list", "{tmp}/afile/runs.txt"], ["cannot write", "afile"]),
    ("index-range", ["{tmp}/sweep.yaml", "--index", "9"], ["--index 9 is out of range", "valid: 0..1"]),
    ("set-deep", ["{tmp}/sweep.yaml", "--set", "norm=" + "[" * 2000 + "]" * 2000], ["--set norm",
                                                                                 "nested more than 32 levels"]),
    ("set-alias-bomb", ["{tmp}/sweep.yaml", "--set", "model_kwargs={a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], "
                        "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a], c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b], "
                        "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c], e: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]}"],
     ["--set model_kwargs", "expands to more than 100000 values"]),
]


@pytest.mark.parametrize("case_id, argv, expected", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_sweep_bad_input(case_id, argv, expected, files, tmp_path):
    from shared import sweep

    (Path(files["tmp"]) / "sweep.yaml").write_text(
        "dataset: digits\nmodel: cifar_resnet20\nexperiment: 's{seed}'\nsweep:\n  seed: [1, 2]\n")
    filled = dict(files, out=str(tmp_path))
    code, message = _run_entry(sweep.main, [_fill(arg, filled) for arg in argv])
    assert code == 2 and "Traceback" not in message, message
    for text in expected:
        assert _fill(text, filled) in message, f"{text!r} not in {message!r}"
    assert not (tmp_path / "runs.txt").exists()  # nothing half-written


ANALYSIS_CASES = [
    ("checkpoint-missing", ["--checkpoint", "{tmp}/none.pth.tar"], ["none.pth.tar", "does not exist"]),
    ("checkpoint-truncated", ["--checkpoint", "{tmp}/half.pth.tar", "--model", "cifar_resnet20"],
     ["half.pth.tar", "cannot be read"]),
    ("checkpoint-other-model", ["--checkpoint", "{ckpt}", "--model", "cifar_resnet18"], ["does not fit", "cifar_resnet18"]),
    ("unknown-model", ["--model", "cifar_resnet32"], ["'cifar_resnet32'", "not a timm model"]),
    ("model-kwargs-yaml", ["--model", "cifar_resnet20", "--model-kwargs", "drop_rate=[0.1"], ["--model-kwargs",
                                                                                           "not a YAML value"]),
    ("out-under-file", ["--model", "cifar_resnet20", "--out", "{tmp}/afile/out"], ["cannot write", "afile"]),
    ("ghost-one", ["--model", "cifar_resnet20", "--ghost-batch-size", "1"], ["--ghost-batch-size must be >= 2"]),
    ("norm-deep", ["--model", "cifar_resnet20", "--norm", "[" * 2000 + "]" * 2000], ["--norm", "nested too deeply"]),
]


@pytest.mark.parametrize("case_id, argv, expected", ANALYSIS_CASES, ids=[c[0] for c in ANALYSIS_CASES])
def test_analysis_bad_input(case_id, argv, expected, files, tmp_path):
    from shared import analysis

    base = ["--synthetic", "--ghost-batch-size", "4", "--batch-size", "8", "--num-batches", "1", "--no-plots",
            "--input-size", "3", "32", "32", "--out", str(tmp_path / "out")]
    code, message = _run_entry(analysis.main, base + [_fill(arg, files) for arg in argv])
    assert code == 2 and "Traceback" not in message, message
    for text in expected:
        assert _fill(text, files) in message, f"{text!r} not in {message!r}"


_BOMB_SCRIPT = """
import json, resource, sys, time
import yaml
from shared import config
status = open("/proc/self/status").read().split("VmSize:")[1].split()
limit = int(status[0]) * 1024 + (64 << 20)  # what is mapped now, plus 64 MiB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
start = time.perf_counter()
try:
    config.parse_args(["-c", sys.argv[1]])
    print("accepted")
except config.ConfigError as error:
    print(f"refused in {time.perf_counter() - start:.3f} s: {error}")
try:  # negative control: the same file, loaded and walked without the limits, needs far more memory
    json.dumps(yaml.safe_load(open(sys.argv[1]).read()))
    print("control: fits")
except MemoryError:
    print("control: MemoryError")
"""


@pytest.mark.slow
def test_alias_bomb_refused_in_well_under_a_second_under_a_memory_limit(files):
    """A real alias bomb (a 600-byte file, 9^9 strings expanded) in a process allowed 64 MiB more memory."""
    repo = Path(__file__).resolve().parent.parent
    bomb = Path(files["tmp"]) / "bomb.yaml"
    assert bomb.stat().st_size < 1000
    result = subprocess.run([sys.executable, "-c", _BOMB_SCRIPT, str(bomb)], capture_output=True, text=True,
                            timeout=300, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 2, result.stdout + result.stderr[-2000:]
    assert lines[0].startswith("refused in ") and "expands to more than 100000 values" in lines[0]
    assert float(lines[0].split()[2]) < 0.5
    assert lines[1] == "control: MemoryError"

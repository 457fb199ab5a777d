"""Every config in configs/ expands to the same runs as before the issue-9 shrink of shared/config.py and
shared/sweep.py: run names, grid points, train.py arguments, output directories, the arguments train.py
resolves from each command (in full for each config's first run, as a digest for the others), and the
wandb sweep; the base configs still fail with the same message. train.py's and validate.py's flags are
unchanged too.

The golden file was written by ``python tests/test_sweep_golden.py`` on the code before that change
(commit 99bce40); rewrite it only for an intended change of what a config means. Two intended changes since:
the five choice flags of train.py and two of validate.py take argparse's ``choices`` instead of a
``choice_type`` function (their recorded type went from ``choice`` to None; the choices are the same), and
``--norm``'s type is ``read_spec_text`` itself instead of its ``spec_type`` wrapper.
"""
import glob
import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared import config, sweep, validate  # noqa: E402

GOLDEN = ROOT / "tests" / "fixtures" / "sweep_expansions.json"
PARSERS = "parsers"
# (config, --set items, --only): the plain expansion of every config, plus overrides and a selection
VARIANTS = [(path, (), None) for path in sorted(glob.glob("configs/**/*.yaml", recursive=True, root_dir=ROOT))] + [
    ("configs/c10_rn20/test_all.yaml", ("output=/scratch/runs", "data_dir=/data/c10", "workers=8"), "*gni16-*"),
    ("configs/c100_rn18/test_all.yaml", ("model_kwargs.block_dropout.p=0.3", "lr=0.05"), None),
    ("configs/i1k_rn50/gbn_accum.yaml", ("log_wandb=true", "wandb_tags=[a, b]"), "*b32*"),
]


def _expansion(path: str, sets: tuple, only) -> dict:
    """What one sweep invocation produces, as plain JSON; an error as its message."""
    try:
        runs = sweep.expand(path, sweep._parse_set(sets), only)
    except sweep.SweepError as error:
        return {"error": str(error)}
    defaults = config.args_to_dict(config.parser_defaults())
    records = []
    for run in runs:
        resolved = config.args_to_dict(config.parse_args(list(run.args)))
        changed = {key: value for key, value in resolved.items()
                   if key not in defaults or _text(value) != _text(defaults[key])}
        records.append({"index": run.index, "name": run.name, "point": run.point, "args": list(run.args),
                        "output_dir": str(run.output_dir), "device": run.device,
                        "resolved_sha256": hashlib.sha256(_text(changed).encode()).hexdigest()})
        if run.index == 0:  # in full once per config, so that a failure shows which value moved
            records[0]["resolved"] = changed
    selection = ([f"--only={only}"] if only else []) + [f"--set={item}" for item in sets]
    return {"runs": records, "wandb_sweep": sweep.wandb_sweep(path, runs, selection)}


def _text(value) -> str:
    """JSON text: tells 1 from 1.0 and True from 1, which == does not."""
    return json.dumps(value, sort_keys=True, default=str)


def _parser_record(parser) -> list:
    """Every flag of ``parser`` as plain values: names, dest, kind, type, default, help, group."""
    groups = {id(action): group.title for group in parser._action_groups for action in group._group_actions}
    return [[action.option_strings, action.dest, type(action).__name__, action.nargs, action.const, action.default,
             getattr(action.type, "__name__", None), list(action.choices or getattr(action.type, "choices", ())),
             action.metavar, action.help, groups.get(id(action))] for action in parser._actions]


def _key(path: str, sets: tuple, only) -> str:
    return " ".join([path, *(f"--set {item}" for item in sets), *([f"--only {only}"] if only else [])])


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_golden_covers_every_config(golden):
    assert sorted(golden) == sorted([PARSERS, *(_key(*variant) for variant in VARIANTS)])


@pytest.mark.parametrize("variant", VARIANTS, ids=[_key(*variant) for variant in VARIANTS])
def test_expansion_is_unchanged(golden, variant, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert _text(_expansion(*variant)) == _text(golden[_key(*variant)])


def test_parsers_are_unchanged(golden):
    """train.py's and validate.py's flags: the same names, defaults, types, help and groups."""
    assert _text(_parser_record(config.create_parser())) == _text(golden[PARSERS]["train.py"])
    assert _text(_parser_record(validate.create_parser())) == _text(golden[PARSERS]["validate.py"])


def write_golden() -> None:
    import os

    os.chdir(ROOT)
    expansions = {_key(*variant): _expansion(*variant) for variant in VARIANTS}
    expansions[PARSERS] = {"train.py": _parser_record(config.create_parser()),
                           "validate.py": _parser_record(validate.create_parser())}
    GOLDEN.write_text(json.dumps(expansions, indent=0, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":
    write_golden()

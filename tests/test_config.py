"""shared.config: timm flag names, YAML configs (bases, strict keys, types, syntax errors), precedence,
{key} templates, sweep validation, and every YAML file under configs/."""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import pytest
import yaml

from shared.config import (ConfigError, args_to_dict, create_parser, format_templates, load_config, parse_args,
                           yaml_text)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


# ----------------------------------------------------------------------------------------------
# flags
# ----------------------------------------------------------------------------------------------

def test_timm_flag_names_and_defaults():
    args = parse_args([])
    expected = dict(model="resnet50", batch_size=128, validation_batch_size=None, opt="sgd", sched="cosine",
                    sched_on_updates=False, warmup_epochs=5, smoothing=0.1, model_ema=False, checkpoint_hist=10,
                    amp=False, epochs=300, weight_decay=2e-5, momentum=0.9, lr=None, lr_base=0.1, seed=42,
                    workers=4, drop_path=None, clip_grad=None, mixup=0.0, train_split="train",
                    val_split="validation", fast_loader="auto", norm=None, model_kwargs={}, config="",
                    data_strict=False)
    assert {key: getattr(args, key) for key in expected} == expected
    short = parse_args(["-b", "64", "-vb", "256", "-j", "2", "--dr", "0.5", "--local_rank", "3"])
    assert (short.batch_size, short.validation_batch_size, short.workers, short.decay_rate, short.local_rank) == \
        (64, 256, 2, 0.5, 3)


def test_special_flag_types():
    args = parse_args(["--model-kwargs", "a=1", "b=relu", "c={'p': 0.1}", "--norm", "[ln, gnir12]",
                       "--torchcompile", "--input-size", "3", "32", "32"])
    assert args.model_kwargs == {"a": 1, "b": "relu", "c": {"p": 0.1}}
    assert args.norm == ["ln", "gnir12"] and args.torchcompile == "inductor" and args.input_size == [3, 32, 32]
    assert parse_args(["--norm", "gni16"]).norm == "gni16"
    assert parse_args(["--norm", '{"subtype": "gbn2d"}']).norm == {"subtype": "gbn2d"}


def test_timm_flags_added_for_timm_users():
    args = parse_args([])
    assert (args.initial_checkpoint, args.img_size, args.aa, args.reprob, args.remode, args.recount, args.bn_momentum,
            args.bn_eps, args.dist_bn, args.no_resume_opt, args.grad_checkpointing) == \
        ("", None, None, 0.0, "pixel", 1, None, None, "reduce", False, False)  # timm's defaults
    args = parse_args(["--initial-checkpoint", "w.pth", "--img-size", "64", "--aa", "rand-m9-mstd0.5", "--reprob",
                       "0.25", "--bn-momentum", "0.01", "--bn-eps", "1e-3", "--dist-bn", "broadcast",
                       "--no-resume-opt", "--grad-checkpointing"])
    assert (args.initial_checkpoint, args.img_size, args.aa, args.reprob, args.bn_momentum, args.bn_eps,
            args.dist_bn, args.no_resume_opt, args.grad_checkpointing) == \
        ("w.pth", 64, "rand-m9-mstd0.5", 0.25, 0.01, 1e-3, "broadcast", True, True)
    with pytest.raises(SystemExit):
        parse_args(["--dist-bn", "average"])


def test_no_log_wandb_turns_off_a_config_value(tmp_path):
    config = write(tmp_path / "run.yaml", "log_wandb: true\n")
    assert parse_args(["-c", str(config)]).log_wandb is True
    assert parse_args(["-c", str(config), "--no-log-wandb"]).log_wandb is False
    assert parse_args(["--log-wandb"]).log_wandb is True and parse_args([]).log_wandb is False


@pytest.mark.parametrize("argv", [["--model-kwargs", "novalue"], ["--fast-loader", "sometimes"],
                                  ["--epochs", "2.5"], ["--no-such-flag"]])
def test_bad_command_lines_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2


# ----------------------------------------------------------------------------------------------
# precedence and bases
# ----------------------------------------------------------------------------------------------

def test_precedence_default_yaml_cli(tmp_path):
    config = write(tmp_path / "run.yaml", """
        lr: 0.5
        batch_size: 64
        model: cifar_resnet20
    """)
    args = parse_args(["-c", str(config), "--lr", "0.2"])
    assert args.lr == 0.2               # command line over YAML
    assert args.batch_size == 64        # YAML over default
    assert args.epochs == 300           # default
    assert args.model == "cifar_resnet20" and args.config == str(config)
    # A flag given with the default's value still overrides the YAML.
    assert parse_args(["--config", str(config), "-b", "128"]).batch_size == 128
    # The flag's position does not matter.
    assert parse_args(["--lr", "0.3", "-c", str(config)]).lr == 0.3


def test_help_with_a_config_lists_its_values_as_the_defaults(tmp_path, capsys):
    config = write(tmp_path / "run.yaml", "model: cifar_resnet20\n")
    for argv, model in ((["-c", str(config), "--help"], "cifar_resnet20"), (["--help"], "resnet50")):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 0
        assert f"timm model name (default: {model})" in " ".join(capsys.readouterr().out.split())


def test_bases_merge_in_order_with_relative_paths(tmp_path):
    write(tmp_path / "base" / "a.yaml", """
        lr: 0.1
        epochs: 10
        model: model_a
    """)
    write(tmp_path / "base" / "b.yaml", """
        bases: common.yaml
        lr: 0.2
    """)
    write(tmp_path / "base" / "common.yaml", """
        weight_decay: 0.0005
        epochs: 20
    """)
    child = write(tmp_path / "runs" / "deep" / "child.yaml", """
        bases: [../../base/a.yaml, ../../base/b.yaml]
        epochs: 5
    """)
    values = load_config(str(child))
    # a, then b (with its own base common first), then the file itself.
    assert values == {"lr": 0.2, "epochs": 5, "model": "model_a", "weight_decay": 0.0005}
    assert "bases" not in values
    reordered = write(tmp_path / "runs" / "other.yaml", "bases: [../base/b.yaml, ../base/a.yaml]\n")
    assert load_config(str(reordered)) == {"weight_decay": 0.0005, "epochs": 10, "lr": 0.1, "model": "model_a"}
    # Merging keeps the merge order of keys (bases first).
    assert list(load_config(str(child))) == ["lr", "epochs", "model", "weight_decay"]


def test_diamond_bases_are_not_a_cycle(tmp_path):
    write(tmp_path / "common.yaml", "epochs: 3\n")
    write(tmp_path / "left.yaml", "bases: [common.yaml]\nlr: 0.1\n")
    write(tmp_path / "right.yaml", "bases: [common.yaml]\nmomentum: 0.8\n")
    top = write(tmp_path / "top.yaml", "bases: [left.yaml, right.yaml]\n")
    assert load_config(str(top)) == {"epochs": 3, "lr": 0.1, "momentum": 0.8}


def test_bases_cycle_and_missing(tmp_path):
    write(tmp_path / "a.yaml", "bases: [sub/b.yaml]\nlr: 0.1\n")
    write(tmp_path / "sub" / "b.yaml", "bases: [../a.yaml]\n")
    with pytest.raises(ConfigError, match=r"cycle.*a\.yaml.*b\.yaml.*a\.yaml"):
        load_config(str(tmp_path / "a.yaml"))
    write(tmp_path / "self.yaml", "bases: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "self.yaml"))
    missing = tmp_path / "m.yaml"
    missing.write_text("lr: 0.1\n\nbases: [nothere.yaml]\n")
    with pytest.raises(ConfigError, match=r"line 3.*'nothere\.yaml' not found"):
        load_config(str(missing))
    bad = write(tmp_path / "bad.yaml", "bases: {a: 1}\n")
    with pytest.raises(ConfigError, match="'bases' must be a list"):
        load_config(str(bad))


# ----------------------------------------------------------------------------------------------
# strict keys, types, syntax
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,hint", [("batchsize", "batch_size"), ("weight-decay", "weight_decay"),
                                      ("lr_bse", "lr_base"), ("epoch", "epochs")])
def test_unknown_key_suggests_close_matches(tmp_path, key, hint):
    config = write(tmp_path / "c.yaml", f"lr: 0.1\n{key}: 1\n")
    with pytest.raises(ConfigError, match=rf"line 2: unknown key '{key}' \(did you mean '{hint}'"):
        load_config(str(config))


def test_unknown_key_without_match_and_non_flag_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'zzzqqq'; keys are"):
        load_config(str(write(tmp_path / "c.yaml", "zzzqqq: 1\n")))
    with pytest.raises(ConfigError, match="unknown key 'config'"):  # -c is not a config key
        load_config(str(write(tmp_path / "d.yaml", "config: other.yaml\n")))


@pytest.mark.parametrize("text,words", [
    ("epochs: 2.5", "epochs: expected an integer"),
    ("lr: abc", "lr: expected a float"),
    ("batch_size: true", "batch_size: expected a int"),
    ("lr: [0.1]", "lr: expected a single value"),
    ("input_size: [3, 32]", "input_size: expected a list of 3 values"),
    ("mean: 0.5", "mean: expected a list"),
    ("mean: []", "mean: expected a non-empty list"),
    ("channels_last: yes please", "channels_last: expected true or false"),
    ("model_kwargs: [1, 2]", "model_kwargs: expected a mapping"),
    ("norm: 16", "norm: expected a spec"),
    ("fast_loader: sometimes", "fast_loader: expected"),
    ("model: true", "model: expected a string"),
])
def test_wrongly_typed_values(tmp_path, text, words):
    config = write(tmp_path / "c.yaml", f"seed: 1\n{text}\n")
    with pytest.raises(ConfigError, match=rf"c\.yaml, line 2: {words}"):
        load_config(str(config))


def test_values_are_converted_like_flags(tmp_path):
    config = write(tmp_path / "c.yaml", """
        lr: 1
        epochs: 7
        fast_loader: on
        torchcompile: true
        input_size: [3, 32, 32]
        mean: [0, 0.5, 1]
        norm: [ln, gnir12]
        model_kwargs: {block_dropout: {p: 0.1}}
        data_dir: null
    """)
    values = load_config(str(config))
    assert values["lr"] == 1.0 and isinstance(values["lr"], float)
    assert values["fast_loader"] == "on" and values["torchcompile"] == "inductor"
    assert values["mean"] == [0.0, 0.5, 1.0] and all(isinstance(v, float) for v in values["mean"])
    assert values["norm"] == ["ln", "gnir12"] and values["data_dir"] is None
    args = parse_args(["-c", str(config)])
    assert args.lr == 1.0 and args.fast_loader == "on" and args.model_kwargs == {"block_dropout": {"p": 0.1}}
    assert parse_args(["-c", str(config), "--fast-loader", "off"]).fast_loader == "off"


def test_yaml_syntax_error_reports_the_line(tmp_path):
    config = write(tmp_path / "c.yaml", """
        lr: 0.1
        epochs: 3
        model: [unclosed
        seed: 1
    """)
    with pytest.raises(ConfigError, match=r"YAML syntax error in .*c\.yaml, line [45], column"):
        load_config(str(config))
    tabbed = tmp_path / "t.yaml"
    tabbed.write_text("lr: 0.1\n\tepochs: 3\n")
    with pytest.raises(ConfigError, match=r"t\.yaml, line 2"):
        load_config(str(tabbed))


def test_missing_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["-c", str(tmp_path / "absent.yaml")])
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(str(tmp_path))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(write(tmp_path / "list.yaml", "- lr\n- 0.1\n")))
    assert load_config(str(write(tmp_path / "empty.yaml", "# nothing\n"))) == {}


# ----------------------------------------------------------------------------------------------
# templates
# ----------------------------------------------------------------------------------------------

def test_templates_use_the_resolved_arguments(tmp_path):
    config = write(tmp_path / "c.yaml", """
        experiment: c100-rn18-{norm}-s{seed}
        train_split: "train[:0.9]-{seed}"
        val_split: "train[0.9:]-{seed}"
        norm: gni16
        model_kwargs: {block_dropout: {p: 0.25}}
        wandb_tags: ["p{model_kwargs[block_dropout][p]}", "lr{lr:g}"]
        lr: 0.05
    """)
    args = parse_args(["-c", str(config), "--seed", "43"])
    assert args.experiment == "c100-rn18-gni16-s43"
    assert (args.train_split, args.val_split) == ("train[:0.9]-43", "train[0.9:]-43")
    assert args.wandb_tags == ["p0.25", "lr0.05"]
    assert parse_args(["-c", str(config), "--norm", "bn"]).experiment == "c100-rn18-bn-s42"


def test_templates_and_non_templates():
    values = format_templates({"a": "{c}-x{items[1]}", "c": 3, "items": [4, 5], "json": '{"subtype": "gbn2d"}',
                               "spec": "{subtype: gbn2d, size: 16}", "plain": "no braces", "nested": {"k": ["{c}"]}})
    assert values["a"] == "3-x5" and values["c"] == 3 and values["nested"] == {"k": ["3"]}
    assert values["json"] == '{"subtype": "gbn2d"}' and values["spec"] == "{subtype: gbn2d, size: 16}"


@pytest.mark.parametrize("values,words", [
    ({"experiment": "{seed.real}", "seed": 1}, "attribute access is not allowed"),
    ({"experiment": "{sede}", "seed": 1}, r"\{sede\} names no argument \(did you mean 'seed'"),
    ({"experiment": "{wandb_name}", "wandb_name": "{experiment}"}, r"wandb_name is itself a template"),
    ({"experiment": "{wandb_name}", "wandb_name": "{seed}", "seed": 1}, r"\{wandb_name\}: wandb_name is itself"),
    ({"experiment": "{model_kwargs[p]}", "model_kwargs": {}}, "has no item 'p'"),
    ({"experiment": "{lr:d}", "lr": 0.1}, "experiment"),
])
def test_template_errors(values, words):
    with pytest.raises(ConfigError, match=words):
        format_templates(values)


def test_template_errors_from_a_config(tmp_path):
    config = write(tmp_path / "c.yaml", "experiment: run-{seed.__class__}\n")
    with pytest.raises(ConfigError, match="attribute access"):
        parse_args(["-c", str(config)])


# ----------------------------------------------------------------------------------------------
# sweeps
# ----------------------------------------------------------------------------------------------

def test_sweep_is_validated_kept_by_load_and_ignored_by_parse(tmp_path):
    config = write(tmp_path / "c.yaml", """
        sweep:
          seed: [1, 2]
          model_kwargs.block_dropout.p: [0.1, 0.2]
          cases: [{norm: bn}, {norm: gni16, lr: 0.2}]
    """)
    assert load_config(str(config))["sweep"]["seed"] == [1, 2]
    args = parse_args(["-c", str(config)])
    assert not hasattr(args, "sweep") and args.seed == 42


@pytest.mark.parametrize("sweep,words", [
    ("{sede: [1, 2]}", r"'sede' is not a train.py argument \(did you mean 'seed'"),
    ("{seed: []}", "non-empty list"),
    ("{seed: 3}", "non-empty list"),
    ("[seed]", "'sweep' must be a mapping"),
    ("{cases: [norm]}", r"sweep.cases\[0\] must be a non-empty mapping"),
    ("{cases: [{nrom: bn}]}", r"sweep.cases\[0\].*'nrom'.*did you mean 'norm'"),
    ("{modle_kwargs.p: [1]}", "did you mean 'model_kwargs'"),
])
def test_bad_sweeps(tmp_path, sweep, words):
    config = write(tmp_path / "c.yaml", f"lr: 0.1\nsweep: {sweep}\n")
    with pytest.raises(ConfigError, match=r"line 2.*" + words):
        load_config(str(config))


# ----------------------------------------------------------------------------------------------
# the project's configs, args.yaml
# ----------------------------------------------------------------------------------------------

def test_configs_are_found():
    assert len(CONFIGS) >= 20


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_project_config_loads(path):
    values = load_config(str(path))
    assert isinstance(values, dict)
    args = parse_args(["-c", str(path)])  # templates format with the defaults of the rest
    assert "{" not in str(args.experiment) or "}" not in str(args.experiment)


def test_args_yaml_round_trip(tmp_path):
    args = parse_args(["--norm", "[ln, gnir12]", "--model-kwargs", "a=(1, 2)", "--mean", "0.5"])
    loaded = yaml.safe_load(yaml_text(args))
    assert loaded == args_to_dict(args)
    assert loaded["model_kwargs"] == {"a": [1, 2]} and loaded["norm"] == ["ln", "gnir12"]
    assert args_to_dict(argparse.Namespace(x=(1, (2, 3)))) == {"x": [1, [2, 3]]}
    # The resolved arguments, less the -c key, load back as a config.
    config = tmp_path / "args.yaml"
    dumped = {k: v for k, v in loaded.items() if k != "config"}
    config.write_text(yaml.safe_dump(dumped))
    again = parse_args(["-c", str(config)])
    assert {k: v for k, v in vars(again).items() if k != "config"} == dumped


def test_parser_is_fresh_each_time():
    first = create_parser()
    first.set_defaults(lr=9.0)
    assert create_parser().parse_args([]).lr is None

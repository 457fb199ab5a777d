"""shared.report: fake run directories (train.py's output contract) -> tables and figures."""
import csv
import json
import math

import pytest
import yaml

from shared import report

BASE_ARGS = dict(model="cifar_resnet18", dataset="torch/cifar100", lr=0.3, batch_size=256, epochs=3,
                 train_split="train", val_split="test", output="/runs", data_dir="/data", workers=4)
FAMILY = "cifar100-cifar_resnet18"  # shared.logging_wandb.experiment_family of BASE_ARGS


def make_run(root, name, status="finished", final_top1=None, best_top1=None, epochs_done=3, curve=True, **args):
    """A run directory as train.py writes it: args.yaml, summary.csv and results.json."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    resolved = {**BASE_ARGS, **args, "experiment": name}
    (run_dir / "args.yaml").write_text(yaml.safe_dump(resolved))
    if curve:
        with open(run_dir / "summary.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["epoch", "train_loss", "eval_loss", "top1", "top5", "lr", "time"])
            for epoch in range(epochs_done):
                top1 = (final_top1 or 50.0) - 2.0 * (epochs_done - 1 - epoch)
                writer.writerow([epoch, 2.0 / (epoch + 1), 2.5 / (epoch + 1), top1, top1 + 20, 0.1, 10.0])
    if status is not None:
        results = {"status": status, "epochs_done": epochs_done, "wall_time_s": 30.0}
        if final_top1 is not None:
            results["final"] = {"epoch": epochs_done - 1, "train_loss": 0.5, "eval_loss": 1.0,
                                "top1": final_top1, "top5": final_top1 + 20}
            results["best"] = {"epoch": epochs_done - 1, "top1": best_top1 or final_top1,
                               "top5": (best_top1 or final_top1) + 20}
        (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    # BN, 3 seeds: final top-1 70.0, 71.0, 72.5; best 70.5, 71.5, 73.0
    for seed, top1 in zip((42, 43, 44), (70.0, 71.0, 72.5)):
        make_run(root, f"c100-rn18-bn-s{seed}", final_top1=top1, best_top1=top1 + 0.5, norm="bn", seed=seed)
    # GNI-16: two finished, one still running (listed, not averaged)
    make_run(root, "c100-rn18-gni16-s42", final_top1=73.0, norm="gni16", seed=42)
    make_run(root, "c100-rn18-gni16-s43", final_top1=74.0, norm="gni16", seed=43)
    make_run(root, "c100-rn18-gni16-s44", status="running", epochs_done=1, norm="gni16", seed=44)
    # GBN-16: only a failed run and a run without results.json: no table row at all
    make_run(root, "c100-rn18-gbn16-s42", status="failed", epochs_done=2, norm="gbn16", seed=42)
    make_run(root, "c100-rn18-gbn16-s43", status=None, epochs_done=1, norm="gbn16", seed=43)
    return root


def test_table_values_are_computed_over_finished_runs_only(runs_dir, tmp_path):
    out = tmp_path / "report"
    result = report.write_report(runs_dir, out, plots=False)
    rows = {row["norm"]: row for row in result["rows"]}
    assert set(rows) == {"bn", "gni16"}  # gbn16 has no finished run
    # BN by hand: mean = (70 + 71 + 72.5) / 3 = 71.1667; deviations -1.1667, -0.1667, 1.3333;
    # sample variance = (1.3611 + 0.0278 + 1.7778) / 2 = 1.5833, std = 1.2583.
    assert rows["bn"]["n"] == 3 and rows["bn"]["seeds"] == "42,43,44"
    assert rows["bn"]["top1_mean"] == pytest.approx(213.5 / 3)
    assert rows["bn"]["top1_std"] == pytest.approx(math.sqrt((1.3611111 + 0.0277778 + 1.7777778) / 2), rel=1e-6)
    assert rows["bn"]["best_top1_mean"] == pytest.approx(213.5 / 3 + 0.5)
    # GNI: the running seed-44 run is not averaged: mean of 73 and 74, std sqrt(0.5).
    assert rows["gni16"]["n"] == 2 and rows["gni16"]["seeds"] == "42,43"
    assert rows["gni16"]["top1_mean"] == pytest.approx(73.5)
    assert rows["gni16"]["top1_std"] == pytest.approx(math.sqrt(0.5))
    # The unfinished runs are listed with their status and progress.
    unfinished = {run.name: run for run in result["unfinished"]}
    assert set(unfinished) == {"c100-rn18-gni16-s44", "c100-rn18-gbn16-s42", "c100-rn18-gbn16-s43"}
    assert unfinished["c100-rn18-gbn16-s42"].status == "failed"
    assert unfinished["c100-rn18-gbn16-s43"].status == "no results.json"
    assert unfinished["c100-rn18-gbn16-s43"].epochs_done == 1  # from summary.csv

    markdown = (out / "results.md").read_text()
    assert "| cifar_resnet18 | bn | 3 | 42,43,44 | 71.17 ± 1.26 | 71.67 ± 1.26 |" in markdown
    assert "| cifar_resnet18 | gni16 | 2 | 42,43 | 73.50 ± 0.71 |" in markdown
    not_finished = markdown.split("## Not finished")[1]
    assert "c100-rn18-gni16-s44 | running | 1 | 3" in not_finished
    with open(out / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["norm"] for r in table] == ["bn", "gni16"]
    assert float(table[0]["top1_std"]) == pytest.approx(rows["bn"]["top1_std"])
    with open(out / "unfinished.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 3


def test_non_result_keys_are_train_flags_and_runs_differing_only_in_them_are_one_setup(tmp_path):
    """One list of the arguments that do not change results (run_files.OPERATIONAL_KEYS): each
    names a flag train.py really has, and the report treats two runs that differ only in those as
    seeds of one setup, while a result-changing flag (lr) still separates them."""
    from shared import config, run_files

    flags = set(vars(config.create_parser().parse_args([])))
    assert run_files.OPERATIONAL_KEYS <= flags, sorted(run_files.OPERATIONAL_KEYS - flags)
    assert report.NON_SETUP_KEYS == run_files.OPERATIONAL_KEYS | {"seed"}
    root = tmp_path / "runs"
    make_run(root, "a-s1", final_top1=60.0, norm="bn", seed=1, workers=2, log_interval=10)
    make_run(root, "b-s2", final_top1=62.0, norm="bn", seed=2, workers=8, log_interval=50)
    make_run(root, "c-s3", final_top1=64.0, norm="bn", seed=3, lr=0.1)
    rows = report.write_report(root, tmp_path / "out", plots=False)["rows"]
    assert sorted(row["n"] for row in rows) == [1, 2]


def test_a_flag_an_older_run_lacks_counts_as_its_default(tmp_path):
    """A run written before a flag existed (its args.yaml lacks the key) is a seed of the same setup
    as today's run with that flag at its default, and still apart from one with another value."""
    from shared import config

    default_recount = config.create_parser().parse_args([]).recount
    root = tmp_path / "runs"
    make_run(root, "old-s1", final_top1=60.0, norm="bn", seed=1)
    make_run(root, "new-s2", final_top1=62.0, norm="bn", seed=2, recount=default_recount)
    make_run(root, "other-s3", final_top1=64.0, norm="bn", seed=3, recount=default_recount + 1)
    result = report.write_report(root, tmp_path / "out", plots=False)
    assert sorted(row["n"] for row in result["rows"]) == [1, 2]
    assert "recount" in (tmp_path / "out" / "results.md").read_text()  # the column that tells them apart


def test_single_run_has_no_std(tmp_path):
    make_run(tmp_path / "runs", "one-s1", final_top1=60.0, norm="bn", seed=1)
    result = report.write_report(tmp_path / "runs", tmp_path / "out", plots=False)
    assert math.isnan(result["rows"][0]["top1_std"])
    assert "| 60.00 |" in result["markdown"]


def test_seeded_split_runs_form_one_setup_and_repeated_seeds_are_flagged(tmp_path):
    root = tmp_path / "runs"
    for seed in (20, 21):
        make_run(root, f"val-s{seed}", final_top1=60.0 + (seed - 20), norm="gbn16", seed=seed,
                 train_split=f"train[:0.9]-{seed}", val_split=f"train[0.9:]-{seed}")
    # the reference's test_all_42 repeated seed 42: two runs of one setup with one seed
    make_run(root, "bn-s42-a", final_top1=70.0, norm="bn", seed=42)
    make_run(root, "bn-s42-b", final_top1=71.0, norm="bn", seed=42)
    result = report.write_report(root, tmp_path / "out", plots=False)
    rows = {row["norm"]: row for row in result["rows"]}
    assert rows["gbn16"]["n"] == 2 and rows["gbn16"]["top1_mean"] == pytest.approx(60.5)
    assert rows["bn"]["duplicate_seeds"]
    assert "42,42 (repeated!)" in result["markdown"]
    # train_split differs between the two setups, so it is shown, in its seed-free form
    header = next(line for line in result["markdown"].splitlines() if line.startswith("| model"))
    assert "train_split" in header


def test_group_by_overrides_the_setup_definition(runs_dir, tmp_path):
    result = report.write_report(runs_dir, tmp_path / "out", group_by=["model"], plots=False)
    assert len(result["rows"]) == 1
    assert result["rows"][0]["n"] == 5  # 3 BN + 2 GNI finished runs


@pytest.mark.parametrize("spec, expected", [
    ("bn", ("bn", None)),
    ("gbn16", ("gbn", 16)),
    ("gni16-shift", ("gni-shift", 16)),
    ("nat1024-scale", ("nat-scale", 1024)),
    ("xbn32", ("xbn", 32)),
    ("ebn8", ("ebn", 8)),
    ("gn1", ("gn1", None)),  # GroupNorm's number is a group count
    ([{"subtype": "xbn2d", "affine": False}, "gnir16", "gain", "bias"], ("xbn2d+gnir", 16)),
    ('[{"type":"norm","subtype":"bn2d","dkwargs":{"affine":false}},'
     '{"type":"noise","subtype":"ghost_noise_injector_rep","dkwargs":{"batch_size":32,"shift_noise":false}},'
     '{"type":"gain","subtype":"standard"},{"type":"bias","subtype":"standard"}]',
     ("bn2d+gnir-scale", 32)),  # structured specs: shared.specs' canonical part names
])
def test_describe_norm(spec, expected):
    assert report.describe_norm(spec) == expected


def test_dropout_of():
    args = {"model_kwargs": {"block_dropout": {"subtype": "flexible_dropout", "kind": "gaussian",
                                               "channel_wise": True, "p": 0.2}}}
    assert report.dropout_of(args) == ("gaussian channel-wise", 0.2)
    assert report.dropout_of({"model_kwargs": {"conv": "ws"}}) is None
    assert report.dropout_of({}) is None


@pytest.mark.slow
def test_figures_ghost_batch_size_dropout_and_curves(tmp_path, capsys):
    root = tmp_path / "runs"
    for method in ("gbn", "gni"):
        for ghost in (4, 16, 64):
            for seed in (20, 21):
                make_run(root, f"{method}{ghost}-s{seed}", final_top1=60 + ghost / 16 + seed - 20,
                         norm=f"{method}{ghost}", seed=seed)
    for seed in (20, 21):
        make_run(root, f"bn-s{seed}", final_top1=61.0 + seed - 20, norm="bn", seed=seed)
        for p in (0.0, 0.1, 0.3):
            make_run(root, f"gedo{p}-s{seed}", final_top1=60 + p, norm="bn", seed=seed,
                     model_kwargs={"block_dropout": {"subtype": "flexible_dropout", "kind": "gaussian",
                                                     "channel_wise": False, "p": p}})
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out), "--band", "sem"]) == 0
    printed = capsys.readouterr().out
    assert "## Finished runs" in printed and f"{FAMILY}_top1_vs_ghost_batch_size.png" in printed
    for kind in ("top1_vs_ghost_batch_size", "top1_vs_dropout_p", "top1_by_setup", "curves_1", "curves_2"):
        data = (out / f"{FAMILY}_{kind}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, kind
    # 6 GBN/GNI setups + BN + 3 dropout setups = 10 setups: two curves files (8 setups per file)
    assert not (out / f"{FAMILY}_curves_3.png").exists()


def test_plots_are_skipped_when_there_is_nothing_to_plot(runs_dir, tmp_path):
    result = report.write_report(runs_dir, tmp_path / "out")
    names = {p.name for p in result["files"]}
    assert f"{FAMILY}_top1_vs_ghost_batch_size.png" in names  # gni16 has an N
    assert f"{FAMILY}_top1_vs_dropout_p.png" not in names  # no block dropout in these runs
    assert "Not drawn: no finished setup of this family has block dropout." in result["markdown"]


def test_command_errors(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no runs" in capsys.readouterr().err
    make_run(tmp_path / "runs", "bn-s1", final_top1=60.0, norm="bn", seed=1)
    (tmp_path / "a-file").write_text("not a directory\n")
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "a-file" / "report")]) == 2
    assert "cannot be created" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Real train.py run directories (embedded digits dataset, a tiny ResNet-20, one epoch)
# ----------------------------------------------------------------------------------------------

TINY = dict(model="cifar_resnet20", dataset="digits", train_split="train[:128]-0", val_split="test[:64]-0",
            epochs=1, batch_size=64, lr=0.05, workers=0, checkpoint_hist=0, log_wandb=False)


def train_tiny(tmp_path, name, **overrides):
    """Train one tiny run with train.py's main() in this process; return (exit code, run dir)."""
    import train

    config_path = tmp_path / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump({**TINY, **overrides, "output": str(tmp_path / "runs"), "experiment": name}))
    return train.main(["-c", str(config_path)]), tmp_path / "runs" / name


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trained")
    codes = {}
    for name, overrides in {"bn-s0": dict(norm="bn", seed=0), "bn-s1": dict(norm="bn", seed=1),
                            "gni4-s0": dict(norm="gni4", seed=0),
                            # stopped after 1 of 2 epochs: status "preempted", resumable
                            "gni4-s1": dict(norm="gni4", seed=1, epochs=2, stop_after=1)}.items():
        codes[name], _ = train_tiny(tmp_path, name, **overrides)
    # a run that died before writing results.json: only its args.yaml is there
    broken = tmp_path / "runs" / "gni4-s2"
    broken.mkdir()
    (broken / "args.yaml").write_text((tmp_path / "runs" / "gni4-s0" / "args.yaml").read_text()
                                      .replace("seed: 0", "seed: 2").replace("gni4-s0", "gni4-s2"))
    return tmp_path / "runs", codes


@pytest.mark.slow
def test_report_on_real_train_runs(trained_runs, tmp_path, capsys):
    root, codes = trained_runs
    assert codes == {"bn-s0": 0, "bn-s1": 0, "gni4-s0": 0, "gni4-s1": 0}
    for name in codes:  # train.py's output contract
        for file in ("args.yaml", "summary.csv", "results.json", "last.pth.tar"):
            assert (root / name / file).is_file(), (name, file)
    assert json.loads((root / "gni4-s1" / "results.json").read_text())["status"] == "preempted"

    out = tmp_path / "report"
    assert report.main([str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = report.write_report(root, tmp_path / "again", plots=False)
    rows = {row["norm"]: row for row in result["rows"]}
    assert set(rows) == {"bn", "gni4"}
    assert rows["bn"]["n"] == 2 and rows["bn"]["seeds"] == "0,1"
    # only the finished GNI run is averaged; the preempted and the broken run are listed
    assert rows["gni4"]["n"] == 1 and rows["gni4"]["seeds"] == "0"
    finals = {name: json.loads((root / name / "results.json").read_text())["final"]["eval_top1"]
              for name in ("bn-s0", "bn-s1", "gni4-s0")}
    assert rows["bn"]["top1_mean"] == pytest.approx((finals["bn-s0"] + finals["bn-s1"]) / 2)
    assert rows["gni4"]["top1_mean"] == pytest.approx(finals["gni4-s0"])
    unfinished = {run.name: run.status for run in result["unfinished"]}
    assert unfinished == {"gni4-s1": "preempted", "gni4-s2": "no results.json"}
    markdown = (out / "results.md").read_text()
    assert "gni4-s1" in markdown.split("## Not finished")[1] and "preempted" in markdown
    assert "gni4-s1" in printed
    for name in ("digits-cifar_resnet20_top1_vs_ghost_batch_size.png", "digits-cifar_resnet20_curves_1.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, name
    assert (out / "results.csv").is_file()


# ----------------------------------------------------------------------------------------------
# Figures worth publishing (issue 13) and a report that survives bad runs and interruptions (issue 10)
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def drawn(monkeypatch):
    """Capture every figure the report saves (still open), keyed by file name."""
    figures = {}
    original = report.save_png

    def capture(fig, path):
        fig.canvas.draw()  # lay out text and legends, so their extents are final
        figures[path.name] = fig
        return original(fig, path)

    monkeypatch.setattr(report, "save_png", capture)
    monkeypatch.setattr(report.pyplot(), "close", lambda fig=None: None)
    return figures


def _several_families(root):
    """CIFAR-100 ResNet-18: BN, GBN-16, GNI-16 and LN -> GNI-12 (one N: the issue's case); CIFAR-10 ViT: LN."""
    for seed in (1, 2, 3):
        make_run(root, f"bn-s{seed}", final_top1=70 + 0.3 * seed, norm="bn", seed=seed)
        make_run(root, f"gbn16-s{seed}", final_top1=71 + 0.5 * seed, norm="gbn16", seed=seed)
        make_run(root, f"gni16-s{seed}", final_top1=72 + 0.4 * seed, norm="gni16", seed=seed)
        make_run(root, f"lngni-s{seed}", final_top1=69 + seed, norm=["ln", "gnir12"], seed=seed)
        make_run(root, f"vit-s{seed}", final_top1=80 + seed, norm="ln", seed=seed, model="cifar_simple_vit",
                 dataset="torch/cifar10")


def _errorbar_halfwidths(ax) -> dict:
    """{legend label: [half-width of each error bar]} of an axes' errorbar containers."""
    from matplotlib.container import ErrorbarContainer

    widths = {}
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer) and container.has_yerr:
            segments = container.lines[2][0].get_segments()
            widths[container.get_label()] = [abs(seg[1][1] - seg[0][1]) / 2 for seg in segments]
    return widths


def test_axis_of_keeps_ln_gni_off_the_ghost_batch_size_axis():
    assert report.axis_of({"norm": "gni16"}) == ("ghost_batch_size", 16)
    assert report.axis_of({"norm": [{"subtype": "xbn2d", "affine": False}, "gnir16", "gain", "bias"]}) == \
        ("ghost_batch_size", 16)
    assert report.axis_of({"norm": ["ln", "gnir12"]}) == ("none", None)
    assert report.axis_of({"norm": "bn"}) == ("none", None)
    assert report.axis_of({"norm": "gn1"}) == ("none", None)
    dropout = {"block_dropout": {"subtype": "flexible_dropout", "kind": "bernoulli", "p": 0.3}}
    assert report.axis_of({"norm": "bn", "model_kwargs": dropout}) == ("dropout_p", 0.3)


def test_one_figure_set_per_family_with_error_bars_for_every_method_and_legends_beside(tmp_path, drawn):
    _several_families(tmp_path / "runs")
    result = report.write_report(tmp_path / "runs", tmp_path / "out")
    names = {path.name for path in result["files"] if path.suffix == ".png"}
    assert names == {"cifar100-cifar_resnet18_top1_vs_ghost_batch_size.png", "cifar100-cifar_resnet18_top1_by_setup.png",
                     "cifar100-cifar_resnet18_curves_1.png", "cifar10-cifar_simple_vit_top1_by_setup.png",
                     "cifar10-cifar_simple_vit_curves_1.png"}
    ax = drawn["cifar100-cifar_resnet18_top1_vs_ghost_batch_size.png"].axes[0]
    # one N, 3 seeds: GBN and GNI both have error bars of +-1 sample std (by hand: seeds 1..3 step
    # 0.5 -> std 0.5; step 0.4 -> std 0.4); the LN -> GNI setup is not on this axis
    widths = _errorbar_halfwidths(ax)
    assert set(widths) == {"gbn (n=3)", "gni (n=3)"}
    assert widths["gbn (n=3)"] == [pytest.approx(0.5)] and widths["gni (n=3)"] == [pytest.approx(0.4)]
    assert ax.get_ylabel() == "final top-1 (%)" and "cifar100-cifar_resnet18" in ax.get_title()
    legend_box, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend_box.x0 >= axes_box.x1  # beside the axes: it covers no data
    setups = drawn["cifar100-cifar_resnet18_top1_by_setup.png"].axes[0]
    assert [t.get_text() for t in setups.get_xticklabels()] == ["ln+gnir N=12 (n=3)", "bn (n=3)"]
    markdown = (tmp_path / "out" / "results.md").read_text()
    for name in names:  # every written figure is embedded in the page, by a relative link
        assert f"]({name})" in markdown
    assert "Not drawn: no finished setup of this family has block dropout." in markdown


def test_metric_sets_labels_and_file_names(tmp_path, drawn):
    _several_families(tmp_path / "runs")
    report.write_report(tmp_path / "runs", tmp_path / "out", metric="eval_loss")
    ax = drawn["cifar100-cifar_resnet18_eval_loss_vs_ghost_batch_size.png"].axes[0]
    assert ax.get_ylabel() == "final eval loss"  # not "(%)"
    assert "final eval loss vs ghost batch size" in ax.get_title()
    assert not (tmp_path / "out" / "cifar100-cifar_resnet18_top1_vs_ghost_batch_size.png").exists()
    assert report.metric_label("best_top1") == "best top-1 (%)"


def test_curves_have_seed_bands_titles_and_one_epoch_points(tmp_path, drawn):
    root = tmp_path / "runs"
    for seed, top1 in ((1, 60.0), (2, 62.0)):
        make_run(root, f"bn-s{seed}", final_top1=top1, norm="bn", seed=seed, epochs_done=1)
    make_run(root, "gni16-s1", final_top1=65.0, norm="gni16", seed=1, epochs_done=1)
    report.write_report(root, tmp_path / "out")
    fig = drawn["cifar100-cifar_resnet18_curves_1.png"]
    ax_top1 = fig.axes[0]
    assert "training curves" in fig._suptitle.get_text() and ax_top1.get_title() == "eval top-1"
    points = {tuple(line.get_xydata()[0]) for line in ax_top1.lines}
    assert points == {(0.0, 61.0), (0.0, 65.0)}  # 1 epoch: a marker at BN's mean of 60 and 62, one at GNI's 65
    assert all(line.get_marker() == "o" for line in ax_top1.lines)
    bands = [c for c in ax_top1.collections if c.get_paths()]
    assert len(bands) == 1  # two BN seeds: a band; one GNI seed: none
    assert ax_top1.get_ylim()[1] - ax_top1.get_ylim()[0] > 0.5  # not the empty -0.04..0.04 frame


def test_nothing_to_draw_is_said_not_drawn(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "bn-s1", final_top1=60.0, norm="bn", seed=1, curve=False)
    result = report.write_report(root, tmp_path / "out")
    assert not [path for path in result["files"] if "curves" in path.name]
    assert "Not drawn: no run of this family has a summary.csv with epochs in it." in result["markdown"]


def test_unreadable_run_directories_are_listed_and_skipped(runs_dir, tmp_path, capsys):
    for name, content in (("bad-yaml", b"norm: [bn\n"), ("a-list", b"- 1\n- 2\n"), ("binary", b"\xff\xfe\x00")):
        (runs_dir / name).mkdir()
        (runs_dir / name / "args.yaml").write_bytes(content)
    bad_summary = make_run(runs_dir, "bad-summary", final_top1=1.0, norm="bn", seed=9)
    (bad_summary / "summary.csv").write_bytes(b"epoch,top1\n\xff\xff\n")
    assert report.main([str(runs_dir), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    err = capsys.readouterr().err
    markdown = (tmp_path / "out" / "results.md").read_text()
    skipped = markdown.split("## Unreadable run directories (skipped)")[1]
    for name in ("bad-yaml", "a-list", "binary", "bad-summary"):
        assert name in skipped and f"skipped unreadable run directory {runs_dir / name}" in err
    assert "| cifar_resnet18 | bn | 3 | 42,43,44 |" in markdown  # the readable runs are reported as before


def test_results_json_that_is_not_a_mapping_is_a_status_not_a_crash(tmp_path):
    """A results.json holding valid JSON that is not an object (a list, a number) makes the run unfinished
    with the reason as its status; the other runs are reported as before."""
    root = tmp_path / "runs"
    make_run(root, "bn-s1", final_top1=60.0, norm="bn", seed=1)
    for name, content in (("a-list", "[1, 2]"), ("a-number", "5"), ("not-json", "{")):
        (make_run(root, name, final_top1=61.0, norm="bn", seed=2) / "results.json").write_text(content)
    result = report.write_report(root, tmp_path / "out", plots=False)
    statuses = {run.name: run.status for run in result["unfinished"]}
    assert statuses["a-list"] == "unreadable results.json (a list, not a mapping)"
    assert statuses["a-number"] == "unreadable results.json (a int, not a mapping)"
    assert statuses["not-json"].startswith("unreadable results.json (Expecting property name")
    assert [(row["norm"], row["n"]) for row in result["rows"]] == [("bn", 1)]


def test_interrupted_report_keeps_the_previous_complete_files(runs_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    report.write_report(runs_dir, out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    make_run(runs_dir, "c100-rn18-gbn16-s44", final_top1=80.0, norm="gbn16", seed=44)  # the report would change
    import os as os_module

    def interrupted(source, target):
        raise KeyboardInterrupt  # Ctrl-C after a temporary file was written, before its rename

    monkeypatch.setattr(os_module, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(runs_dir, out)
    monkeypatch.undo()
    after = {path.name: path.read_bytes() for path in out.iterdir() if not path.name.endswith(".tmp")}
    assert after == before  # every file complete and unchanged; only a .tmp beside them
    assert report.write_report(runs_dir, out)["rows"][1]["norm"] == "gbn16"  # the next run completes


def test_runs_with_other_ghost_batch_semantics_are_not_averaged(tmp_path):
    root = tmp_path / "runs"
    for seed in (1, 2):
        make_run(root, f"bn-s{seed}", final_top1=70.0 + seed, norm="gbn16", seed=seed)
    # the same arguments on 2 processes: each draws ghost batches from its own 256 samples
    ddp = make_run(root, "bn-ddp-s3", final_top1=90.0, norm="gbn16", seed=3)
    results = json.loads((ddp / "results.json").read_text())
    (ddp / "results.json").write_text(json.dumps({**results, "world_size": 2, "per_process_batch": 256}))
    result = report.write_report(root, tmp_path / "out", plots=False)
    rows = sorted(result["rows"], key=lambda row: row["n"])
    assert [(row["n"], row["world_size"]) for row in rows] == [(1, "2"), (2, "1")]
    assert rows[1]["top1_mean"] == pytest.approx(72.5 - 1.0)
    assert "per_process_batch" not in result["markdown"]  # it only repeats batch_size here
    grouped = report.write_report(root, tmp_path / "out2", group_by=["model"], plots=False)
    assert len(grouped["rows"]) == 2  # --group-by cannot merge them either


def test_timm_metric_names_are_read_too(tmp_path):
    run_dir = make_run(tmp_path / "runs", "bn-s1", final_top1=None, norm="bn", seed=1, curve=False)
    (run_dir / "results.json").write_text(json.dumps({
        "status": "finished", "epochs_done": 1, "final": {"eval_top1": 55.0, "eval_loss": 1.5},
        "best": {"eval_top1": 56.0}}))
    (run_dir / "summary.csv").write_text("epoch,train_loss,eval_loss,eval_top1\n0,2.0,1.5,55.0\n")
    result = report.write_report(tmp_path / "runs", tmp_path / "out")
    row = result["rows"][0]
    assert row["top1_mean"] == 55.0 and row["best_top1_mean"] == 56.0
    assert report.metric_value({"eval_top1": 55.0}, "top1") == 55.0
    assert report.metric_value({"top1": float("nan")}, "top1") is None
    assert any("curves" in path.name for path in result["files"])

"""bench: the smallest configuration runs end to end and prints the stable table (no timings asserted)."""
import math

import pytest

from bench import __main__ as bench_main
from bench import end_to_end
from bench.table import COLUMNS, Row, Target, format_table


def _table_rows(text: str) -> list:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_smoke_run_prints_every_layer_step_and_data_row(capsys):
    assert bench_main.main(["--smoke", "--device", "cpu", "--only", "layers,step,data", "--workers", "0"]) == 0
    output = capsys.readouterr().out
    assert "# device: cpu" in output
    header, *rows = _table_rows(output)
    assert header == list(COLUMNS)
    cases = {(row[0], row[1], row[2]) for row in rows}
    for layout in ("contiguous", "channels_last"):
        for case in ("bn (nn.BatchNorm2d)", "gni16 (fused GhostNoiseBatchNorm2d)", "gbn16", "xbn32",
                     "en8 (EvalNorm2d)", "flexible_dropout p=0.2"):
            assert ("layers", case, layout) in cases
    assert {row[1] for row in rows if row[0] == "step"} == {
        f"cifar_resnet20 b32 {name}" for name in ("bn", "gni16 (fused)", "gni16 unfused", "gbn16", "xbn32")}
    assert sum(row[0] == "data" for row in rows) == 2
    for row in rows:
        assert len(row) == len(COLUMNS)
        assert row[7] in ("PASS", "MISS", "-") and row[11] in ("PASS", "MISS", "-")
        float(row[3]), float(row[5])  # numbers, not placeholders
    baselines = [row for row in rows if row[1] in ("bn (nn.BatchNorm2d)", "cifar_resnet20 b32 bn")]
    assert all(row[5] == "1.000" and row[9] == "1.000" for row in baselines)


def test_status_columns_follow_targets_and_missing_measurements():
    rows = [Row("s", "fast", "contiguous", 1.0, "ms", 1.1, Target(1.15), 2 ** 20, 1.2, Target(1.05)),
            Row("s", "failed", "contiguous", math.nan, "img/s", math.nan, Target(20, at_most=False))]
    _, fast, failed = _table_rows(format_table(rows))
    assert fast[6:] == ["<=1.15", "PASS", "1.00", "1.200", "<=1.05", "MISS"]
    assert failed[3] == "nan" and failed[6:8] == [">=20", "MISS"]


def test_image_folder_and_rate_parsing(tmp_path):
    end_to_end.write_image_folder(str(tmp_path), {"train": 4, "validation": 2}, classes=2)
    assert len(list((tmp_path / "train").rglob("*.png"))) == 4
    match = end_to_end._RATE.search("epoch 0 [    2/10] loss 2.3026 lr 0.1 1234 img/s")
    assert match and float(match.group(1)) == 1234


def test_unknown_section_is_an_error():
    with pytest.raises(SystemExit):
        bench_main.parse_args(["--only", "layer"])

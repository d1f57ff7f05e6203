"""ttr decode-bench at tiny sizes: every system measured, rows saved as JSON and CSV, the plot, an 80-column table.
Nothing here is timed: the bench's own timings are only checked to exist."""

import csv
import json

import pytest

from ttr import bench_decode
from ttr.cli import main


def test_decode_bench_runs_and_saves(tmp_path):
    cfg = bench_decode.DecodeConfig(contexts=(8, 16), d_model=32, heads=2, steps=2, repeats=2, out=str(tmp_path),
                                    max_context={"intention": 8})
    ticks = []
    rows = bench_decode.run(cfg, progress=ticks.append)
    assert len(ticks) == bench_decode.ticks(cfg)
    systems = {(r.system, r.context) for r in rows}
    want = {(m, c) for m in (bench_decode.PLAIN, *bench_decode.MEMORIES) for c in (8, 16)} - {("intention", 16)}
    assert systems == want
    for r in rows:
        assert 0 < r.min_ms <= r.median_ms <= r.max_ms and r.tokens_per_s > 0 and r.steps >= 2
        if r.system == bench_decode.PLAIN:
            assert r.ratio_median == r.ratio_min == 1.0
    saved = json.loads((tmp_path / "decode.json").read_text())
    assert saved["config"]["threads"] >= 1 and len(saved["rows"]) == len(rows)
    assert len(list(csv.DictReader(open(tmp_path / "decode.csv")))) == len(rows)
    assert (tmp_path / "decode.png").stat().st_size > 0
    lines = bench_decode.table(rows)
    assert all(len(line) <= 80 for line in lines) and len(lines) == 1 + 1 + len(bench_decode.MEMORIES)


def test_decode_bench_command(tmp_path, capsys):
    assert main(["decode-bench", "--memories", "gated_deltanet,softmax_attention", "--contexts", "8", "--d-model",
                 "16", "--heads", "2", "--steps", "2", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gated_deltanet" in out and "1 CPU" in out and (tmp_path / "decode.csv").exists()


@pytest.mark.parametrize("args,match", [(["--memories", "nope"], "unknown memory"),
                                        (["--max-context", "intention"], "name=N"),
                                        (["--heads", "3"], "must divide")])
def test_decode_bench_bad_arguments(tmp_path, capsys, args, match):
    assert main(["decode-bench", "--d-model", "16", "--out", str(tmp_path), *args]) == 2
    assert match in capsys.readouterr().out

"""The commands run end to end on small sizes and write what they say."""

import json

import pytest
import torch

from ttr.cli import main


def test_zoo_lists_every_preset(capsys):
    import ttr

    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    for name in ttr.PRESETS:
        assert name in out


def test_zoo_all_fits_80_columns(monkeypatch):
    """`ttr zoo --all` was about 160 columns wide, wrapped into an unreadable mess at 80."""
    import io

    from rich.console import Console

    from ttr import cli

    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=80))
    assert cli.main(["zoo", "--all"]) == 0
    lines = out.getvalue().splitlines()
    tables = [i for i, line in enumerate(lines) if "function class:" in line]
    # every table's rows stay on one line each: a header, a rule, then one line per optimizer
    assert all(len(line) <= 80 for line in lines) and len(tables) > 1
    header = lines[tables[0] + 2].split()
    assert header[:2] == ["optimizer", "U"] and lines[tables[0] + 4].split()[:3] == ["GD", "1", "la"]


def test_regress_writes_table_plot_and_results(tmp_path, capsys):
    assert main(["regress", "--length", "256", "--sequences", "8", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "regress.png").stat().st_size > 10_000
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["memory"]: r for r in res["rows"]}
    # Forgetting is what lets a memory follow the switch: every gated memory ends below plain linear attention.
    for gated in ("retnet", "mamba2", "gla"):
        assert rows[gated]["cos_final"] < 0.7 * rows["linear_attention"]["cos_final"]
    assert "mamba2" in capsys.readouterr().out


def test_bench_small_grid_writes_json(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "--lengths", "64,100", "--head-dims", "16", "--repeats", "1", "--recurrent-lengths", "100",
                 "--conditioning-length", "300", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["matmul_gflops"] > 0
    from ttr.bench import CASES, NYSTROM_LANDMARKS, RATIO_PAIRS, has_recurrent, has_reference

    assert len(res["rows"]) == 2 * sum(len(g) for g in CASES.values())  # every op and gate (or variant), 2 lengths
    assert {r["op"] for r in res["rows"]} == set(CASES)
    assert res["config"]["threads"] == torch.get_num_threads()
    for row in res["rows"]:
        assert row["chunk_fwdbwd_ms"] > 0 and row["sdpa_fwdbwd_ms"] > 0 and row["peak_mb"] is not None
        assert 0 < row["chunk_fwdbwd_min_ms"] <= row["chunk_fwdbwd_ms"] and row["spread"] >= 0
        assert row["unchecked_fwd_min_ms"] > 0  # the forward with ttr.checks(False), for the chk column
        assert (row["recurrent_fwdbwd_ms"] is not None) == (row["T"] == 100 and has_recurrent(row["op"], row["gate"]))
        assert (row["ref_fwdbwd_ms"] is not None) == has_reference(row["op"], row["gate"])
    assert {r["gate"] for r in res["rows"] if r["op"] == "feature_map"} == set(CASES["feature_map"])
    nystrom = {(e["method"], e["n_landmarks"]): e for e in res["nystrom_error"]}
    assert set(nystrom) == {(m, n) for m in ("soft", "skyformer") for n in NYSTROM_LANDMARKS}
    for method in ("soft", "skyformer"):  # more landmarks, closer to the smoother the method approximates
        assert nystrom[method, NYSTROM_LANDMARKS[-1]]["smoother"] < nystrom[method, NYSTROM_LANDMARKS[0]]["smoother"]
    errors = {s["solver"]: s["rel_error_vs_float64"] for s in res["mesa_solvers"]}
    assert errors["exact float32"] < 1e-4 and errors["cg 32"] < errors["cg 1"]  # CG converges towards exact
    assert errors["cg default"] < 1e-4
    assert len(res["mesa_conditioning"]) == 4
    # every pair of the speed targets, at both lengths, timed again in alternation
    ratios = {(x["row"], x["over"], x["T"]): x for x in res["ratios"]}
    assert set(ratios) == {(" ".join(a), " ".join(b), T) for a, b in RATIO_PAIRS for T in (64, 100)}
    for x in ratios.values():
        assert x["min_ratio"] == pytest.approx(x["row_min_ms"] / x["over_min_ms"])
        assert x["median_ratio"] == pytest.approx(x["row_median_ms"] / x["over_median_ms"])
    assert all(c["chunk_rel_error"] < 1e-2 and c["recurrent_rel_error"] < 1e-5 for c in res["mesa_conditioning"])


def test_interrupted_bench_resumes_from_what_it_saved(tmp_path):
    out = tmp_path / "b.json"
    args = ["bench", "--lengths", "32,48", "--head-dims", "8", "--gates", "none,scalar", "--ops", "linear_attention",
            "--repeats", "1", "--out", str(out)]
    assert main(args) == 0
    full = json.loads(out.read_text())
    # An interruption after the first timed row: the file holds that row only, its memory not yet measured.
    kept = dict(full["rows"][0], peak_mb=None)
    out.write_text(json.dumps(dict(full, rows=[kept])))
    assert main(args + ["--resume"]) == 0
    resumed = json.loads(out.read_text())
    assert len(resumed["rows"]) == 4
    assert resumed["rows"][0]["chunk_fwdbwd_ms"] == kept["chunk_fwdbwd_ms"]  # reused, not re-timed
    assert resumed["rows"][0]["peak_mb"] is not None


def test_bad_argument_is_a_clear_error(tmp_path, capsys):
    assert main(["regress", "--decay", "1.5", "--length", "64", "--out", str(tmp_path)]) == 2
    assert "decay must be in (0, 1)" in capsys.readouterr().out


def test_bench_timing_interleaves_repeats_and_warns_of_a_loaded_machine():
    from ttr import bench

    order = []
    t = bench.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, torch.device("cpu"), 3)
    assert order == ["a", "b"] * 4  # a warm-up round, then three rounds taking each form in turn
    assert all(x.min <= x.median <= x.max for x in t.values())
    quiet = bench.BenchRow("la", "none", 64, 16, 1.0, 2.0, None, None, 1.0, 4.0, None, chunk_fwdbwd_min_ms=1.9,
                           spread=0.05)
    assert bench.load_warning([quiet]) is None and quiet.vs_sdpa == pytest.approx(4.0 / 1.9)
    loaded = bench.BenchRow("la", "vector", 64, 16, 3.0, 2.0, None, None, 1.0, 4.0, None, spread=0.6)
    warning = bench.load_warning([quiet, loaded])
    assert "1 of 2 rows" in warning and "60%" in warning and "forward slower than its forward+backward" in warning


def _kept_in_fresh_process(code: str, **env: str) -> str:
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "TTR_RELEASE_MEMORY"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_executable_keeps_freed_memory_and_the_library_does_not(monkeypatch):
    """`ttr` (cli.run) asks glibc to keep what it frees; importing ttr and running an op leaves the host's
    allocator alone; MALLOC_* settings of the user's own, or TTR_RELEASE_MEMORY=1, win."""
    from ttr import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1))
    assert cli.run(["zoo"]) == 0 and calls == [1]
    library = ("import torch, ttr; from ttr._memory import freed_memory_kept; "
               "ttr.ops.delta_rule(*torch.randn(3, 1, 8, 1, 4), torch.full((1, 8, 1), 0.5), qk_l2norm=True); print(freed_memory_kept())")
    assert _kept_in_fresh_process(library) == "False"
    keep = "from ttr._memory import keep_freed_memory, freed_memory_kept; print(keep_freed_memory(), freed_memory_kept())"
    assert _kept_in_fresh_process(keep) == "True True"
    assert _kept_in_fresh_process(keep, TTR_RELEASE_MEMORY="1") == "False False"
    assert _kept_in_fresh_process(keep, MALLOC_ARENA_MAX="2") == "False False"

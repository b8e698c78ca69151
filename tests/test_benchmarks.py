"""The benchmark suite runs and writes a well-formed result; no speed is ever asserted here.

The end-to-end run takes the cheap benchmarks (``checkpoint_stall`` with 2 timed pairs on the moto
S3 server, ``scale_projection``); the multi-process path is covered by one 2-rank ZeRO-2
measurement, whose byte accounting (not a timing) must match the ZeRO formula, and one tiny 2-rank run
of the communication-dtype workers.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import BENCHMARKS
from benchmarks.harness import ANCHOR, MEASURED, NO_GPU, PROJECTION, Context, Goal, alternate

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ("checkpoint_stall", "scale_projection")
GPU_ROWS = ("mfu/", "model/cuda/")


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.unit
def test_alternate_runs_a_b_a_b_after_warmup():
    calls: list[str] = []
    clock = iter(range(100))

    def timer(fn) -> float:
        fn()
        return float(next(clock) + 1)

    stats = alternate(lambda: calls.append("a"), lambda: calls.append("b"), reps=3, warmup=2, timer=timer)
    assert calls == ["a", "b"] * 5
    assert stats.reps == 3 and stats.a_s == [5.0, 7.0, 9.0] and stats.b_s == [6.0, 8.0, 10.0]
    assert stats.ratio == 7.0 / 8.0 and stats.ratio_min == 5.0 / 6.0 and stats.ratio_max == 9.0 / 10.0


@pytest.mark.unit
def test_alternate_groups_interleave_and_sum():
    calls: list[str] = []
    stats = alternate(lambda: calls.append("a"), lambda: calls.append("b"), reps=2, warmup=1, group=3,
                      timer=lambda fn: (fn(), 1.0)[1])
    assert calls == ["a", "b"] * 9
    assert stats.a_s == stats.b_s == [3.0, 3.0]


@pytest.mark.unit
def test_goal_met():
    assert Goal("<=", 0.10).met(0.10) and not Goal("<=", 0.10).met(0.11)
    assert Goal(">=", 1.0).met(1.2) and not Goal(">=", 1.0).met(0.99)
    assert Goal("~", 1.0, 0.10).met(0.9) and Goal("~", 1.0, 0.10).met(1.1) and not Goal("~", 1.0, 0.10).met(1.11)
    assert Goal("").met(5.0) is None and Goal("<=", 1.0).met(None) is None


@pytest.mark.unit
def test_only_rejects_unknown_benchmarks():
    proc = bench("--only", "bogus", timeout=60)
    assert proc.returncode != 0
    assert "bogus" in proc.stderr and all(name in proc.stderr for name in BENCHMARKS)


@pytest.mark.integration
def test_quick_run_writes_a_well_formed_result(tmp_path):
    import torch

    from benchmarks.report import SCHEMA, TITLES

    proc = bench("--quick", "--only", ",".join(CHEAP), "--reps", "2", "--out", str(tmp_path), "--stem", "t")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "t.json").read_text())
    md = (tmp_path / "t.md").read_text()
    assert result["schema"] == SCHEMA and result["quick"] and result["only"] == list(CHEAP)
    assert result["errors"] == {} and set(result["benchmark_durations_s"]) == set(CHEAP)

    ctx = Context(quick=True, threads=1, workdir=str(tmp_path))
    planned = [(name, row) for name in BENCHMARKS for row in importlib.import_module(f"benchmarks.{name}").plan(ctx)]
    assert [r["id"] for r in result["rows"]] == [row.id for _, row in planned]
    assert "| Figure | Sides | Goal | Result (median) | min – max | n | Met | Context |" in md
    for (name, row), got in zip(planned, result["rows"]):
        assert got["bench"] == name and got["goal"]["text"] == row.goal.text()
        assert row.goal.text() in md and row.what in md
        filled = got["status"] in (MEASURED, PROJECTION, ANCHOR)
        headline = got["ratio"] if got["kind"] == "ratio" else got["value"]
        assert filled == (headline is not None), got
        assert filled or got["status"].startswith(("not measured (", "not run (")), got
        assert got["met"] in (True, False, None) and (got["met"] is None or filled)
        if name in CHEAP:
            assert filled and got["context"], got
        elif row.id.startswith(GPU_ROWS) and not torch.cuda.is_available():
            assert got["status"] == NO_GPU, got
        else:
            assert got["status"].startswith("not run ("), got
    assert all(TITLES[name] in md for name in BENCHMARKS)
    rows = {r["id"]: r for r in result["rows"]}
    assert rows["ckpt/async-stall-vs-blocking"]["reps"] == 2
    assert rows["scale/xl22k-gpu-hours"]["status"] == (PROJECTION if torch.cuda.is_available() else ANCHOR)


@pytest.mark.integration
def test_zero_memory_two_ranks_match_the_formula(tmp_path):
    from benchmarks.zero_memory import TERMS, launch, theory

    ctx = Context(quick=True, threads=1, workdir=str(tmp_path))
    per_rank = launch(ctx, 2, (2,), timeout_s=240)
    assert [r[0]["rank"] for r in per_rank] == [0, 1]
    for (result,) in per_rank:
        expected = theory(result["psi"], 2, 2)
        measured = sum(result["bytes"][t] for t in (*TERMS, "other"))
        assert measured / sum(expected.values()) == pytest.approx(1.0, abs=0.10)
        assert result["bytes"]["fp32_master"] == pytest.approx(expected["fp32_master"], rel=0.01)
        assert result["bytes"]["adam"] == pytest.approx(expected["adam"], rel=0.01)


@pytest.mark.integration
def test_communication_dtype_workers_time_both_sides(tmp_path):
    from benchmarks.harness import launch_ranks

    ctx = Context(quick=True, threads=1, workdir=str(tmp_path))
    out = launch_ranks(ctx, 2, "benchmarks.engine_overhead", ["--reps", "1", "--px", "32", "--micro", "4"], "comm",
                       timeout_s=240)
    result = json.loads((Path(out) / "rank0.json").read_text())
    for clock in ("cpu", "wall"):
        times = result[clock]["a_s"] + result[clock]["b_s"]
        assert len(times) == 2 and min(times) > 0, result
    assert result["psi"] > 3_000_000  # convnext_atto

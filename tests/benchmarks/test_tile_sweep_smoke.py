"""benchmarks/bench_tile_sweep.py: the GPU run's bookkeeping (sweep order, time box, winners) on
synthetic rows, so it does not rot without a card. The CPU smoke run end to end (every candidate
of every op once, in the interpreter, checked against the table tile's output) is checked on the
GPU suite's CPU pass (``test_bench_smoke.check_tile_sweep_outputs``)."""

import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "benchmarks")


@pytest.fixture(scope="module")
def sweep_module():
    sys.path.insert(0, BENCH)
    try:
        import bench_tile_sweep
    finally:
        sys.path.remove(BENCH)
    return bench_tile_sweep


class _FakeOp:
    name = "op"

    def label(self, tile):
        return str(tile)


class _FakeProblem:
    def __init__(self, key, tiles):
        self.op, self.key, self.tiles = _FakeOp(), key, tiles


def test_plan_times_every_table_tile_first(sweep_module):
    a, b = _FakeProblem("a", ["A0", "A1", "A2"]), _FakeProblem("b", ["B0", "B1"])
    order = [(p.key, i) for p, i in sweep_module.plan([a, b])]
    assert order == [("a", 0), ("b", 0), ("a", 1), ("a", 2), ("b", 1)]


def test_time_box_skips_and_says_so(sweep_module):
    rows = sweep_module.sweep([_FakeProblem("a", ["A0", "A1"])], smoke=False, time_box_s=-1.0,
                              rep_ms=1, device=None, dtype=None)
    assert len(rows) == 2 and all(r["status"].startswith("skipped: time box") for r in rows)
    assert all(math.isnan(r["gpu_ms"]) for r in rows)


def test_winners_fastest_matching_per_key(sweep_module):
    def row(key, tile, ms, table=0, match=1):
        return {"op": "op", "key": key, "tile": tile, "table": table, "gpu_ms": ms,
                "match": match, "winner": 0}

    rows = [row("k", "t0", 2.0, table=1), row("k", "t1", 1.0, match=0), row("k", "t2", 1.5),
            row("k", "t3", math.nan), row("j", "u0", 3.0, table=1)]
    won = sweep_module.winners(rows)
    assert won["op"]["k"]["tile"] == "t2" and won["op"]["k"]["speedup_over_table"] == 2.0 / 1.5
    assert won["op"]["j"]["tile"] == "u0" and won["op"]["j"]["speedup_over_table"] == 1.0
    assert [r["tile"] for r in rows if r["winner"]] == ["t2", "u0"]

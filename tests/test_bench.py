"""The benchmark machinery on a tiny shape: JSON fields, FLOP ideal, interleaving. Not a timing test."""

from __future__ import annotations

import json

import pytest

from satlm.bench.cli import main

TINY = ["--hidden-size", "64", "--intermediate-size", "160", "--heads", "4", "--kv-heads", "2",
        "--vocab-size", "256", "--seq-len", "32", "--batch-size", "2", "--warmup", "1", "--repeats", "2",
        "--device", "cpu", "--rates", "0.25,0.75"]


@pytest.mark.parametrize("per_layer", [False, True])
def test_bench_writes_results(tmp_path, monkeypatch, per_layer):
    monkeypatch.setenv("SATLM_BENCH_REEXEC", "1")  # stay in this process
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    argv = TINY + ["--layers", "2", "--json", str(out), "--plot", str(png)] + (["--per-layer"] if per_layer else [])
    assert main(argv) == 0
    record = json.loads(out.read_text())
    rows = record["results"]
    assert [(r["source"], r["rate"]) for r in rows] == [("current", 0.25), ("current", 0.75),
                                                        ("history", 0.25), ("history", 0.75)]
    for r in rows:
        for key in ("source", "rate", "ideal_speedup", "speedup", "efficiency", "tokens_per_second",
                    "peak_memory_bytes"):
            assert key in r
        assert r["repeats"] == 2 and r["peak_memory_bytes"] > 0
    by = {(r["source"], r["rate"]): r["ideal_speedup"] for r in rows}
    # More omission, fewer FLOPs; history shrinks every projection, so its ideal beats paper mode.
    assert 1.0 < by[("current", 0.25)] < by[("current", 0.75)]
    assert by[("history", 0.75)] > by[("current", 0.75)]
    assert record["dense"]["ideal_speedup"] == 1.0
    assert png.stat().st_size > 1000


def test_bench_rejects_bad_rates(monkeypatch):
    monkeypatch.setenv("SATLM_BENCH_REEXEC", "1")
    with pytest.raises(SystemExit, match="rates"):
        main(TINY + ["--rates", "0.5,1.2"])

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


def test_kept_size_yardstick(tmp_path, monkeypatch):
    """--kept-size times a dense model of each rate's kept size in the same round-robin and reports its speedup
    beside each SAT row (not a timing test: the fields and the models' shapes are checked)."""
    monkeypatch.setenv("SATLM_BENCH_REEXEC", "1")
    out = tmp_path / "k.json"
    assert main(TINY + ["--layers", "2", "--kept-size", "--sources", "history", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["rate"] for r in rows] == [0.25, 0.75]
    for r in rows:
        assert r["kept_size_speedup"] > 0 and r["kept_size_ideal_speedup"] > 1.0
    assert rows[1]["kept_size_ideal_speedup"] > rows[0]["kept_size_ideal_speedup"]


@pytest.mark.parametrize("heads,kv,unit,rate,expect", [
    (8, 8, "head", 0.5, (4, 4, 704)),  # plain multi-head: kept heads
    (8, 8, "head", 0.25, (6, 6, 1056)),  # 512 / 6 is no integer: head_dim stays 64 explicitly
    (8, 2, "head", 0.5, (4, 1, 704)),  # GQA: KV groups kept in proportion, all their query heads
    (8, 2, "kv_group", 0.75, (4, 1, 352)),  # kept_count(2, 0.75) = max(1, round(0.5)) = 1 group
])
def test_kept_size_model_shape(heads, kv, unit, rate, expect):
    import torch

    from satlm.bench.runner import Shape, build_model, kept_size_model

    model = build_model(Shape(512, 1408, heads, kv, 1, 256), None, torch.float32, "cpu", 16)
    kept = kept_size_model(model, rate, unit)
    attn, mlp = kept.model.layers[0].self_attn, kept.model.layers[0].mlp
    assert (attn.q_proj.out_features // 64, attn.k_proj.out_features // 64, mlp.gate_proj.out_features) == expect
    assert attn.o_proj.in_features == expect[0] * 64 and attn.head_dim == 64
    assert kept(torch.randint(0, 256, (1, 8))).logits.shape == (1, 8, 256)
    assert model.config.num_attention_heads == heads  # the original is untouched


@pytest.mark.parametrize("per_layer", [False, True])
def test_bench_lora_and_dense_forward_rows(tmp_path, monkeypatch, per_layer):
    """--lora R: LoRA-dense against LoRA-SAT, the FLOP ideal counting the LoRA GEMMs (and no weight gradient of
    the frozen base, so it beats full fine-tuning's at the same rate); --forwards adds forward=dense rows, whose
    ideal lies below sparse's (its forward is whole)."""
    pytest.importorskip("peft")
    monkeypatch.setenv("SATLM_BENCH_REEXEC", "1")
    out, full = tmp_path / "l.json", tmp_path / "f.json"
    common = TINY + ["--layers", "2", "--sources", "current", "--forwards", "sparse,dense", "--kept-size"]
    common += ["--per-layer"] if per_layer else []
    assert main(common + ["--lora", "4", "--json", str(out)]) == 0
    assert main(common + ["--json", str(full)]) == 0
    rows, plain = json.loads(out.read_text())["results"], json.loads(full.read_text())["results"]
    assert [(r["forward"], r["rate"]) for r in rows] == [("sparse", 0.25), ("sparse", 0.75), ("dense", 0.25),
                                                         ("dense", 0.75)]
    by = {(r["forward"], r["rate"]): r for r in rows}
    assert 1.0 < by[("dense", 0.75)]["ideal_speedup"] < by[("sparse", 0.75)]["ideal_speedup"]
    assert all("kept_size_speedup" in r for r in rows)
    assert json.loads(out.read_text())["shape"]["lora"] == 4
    flops = {(r["forward"], r["rate"]): r["flops"] for r in plain}
    assert by[("sparse", 0.75)]["flops"] < flops[("sparse", 0.75)]  # frozen base: no weight-gradient GEMMs

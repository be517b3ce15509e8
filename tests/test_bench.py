"""The benchmark machinery on a tiny shape: JSON fields, FLOP ideal, interleaving. Not a timing test."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from satlm import SATConfig
from satlm.bench.cli import SWEEP_DEFAULTS, SWEEPS, _parse_list, bench_config, main, parser, sat_flags
from satlm.bench.settings import HELD, UNUSED, held

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
    # Every row names the setting it measured; by default the library's: current runs the dense forward, history
    # the thinned one (forward auto), top-k selection, heads kept, MLP channels at the row's rate.
    for r in [record["dense"]] + rows:
        assert {"forward", "selection", "attn_rate", "mlp_rate"} <= set(r)
    assert [r["forward"] for r in rows] == ["dense", "dense", "sparse", "sparse"]
    assert all(r["selection"] == "topk" and r["attn_rate"] == 0.0 and r["mlp_rate"] == r["rate"] for r in rows)
    assert (record["dense"]["forward"], record["dense"]["attn_rate"], record["dense"]["mlp_rate"]) == ("dense", 0, 0)
    assert record["sat"] == {k: v for k, v in held(SATConfig()).to_dict().items()
                             if k not in ("omission_rate", "source", "forward")}
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


def test_bench_rates_have_satconfigs_range():
    assert _parse_list("0, 0.5,0.99", "rates", "omission_rate") == [0.0, 0.5, 0.99]  # [0, 1), as SATConfig
    with pytest.raises(SystemExit, match=r"--rates has '1.0', which must be a number in \[0, 1\)"):
        _parse_list("0.5,1.0", "rates", "omission_rate")
    with pytest.raises(SystemExit, match="--sources has 'future', which is not allowed; choose one of current, "):
        _parse_list("current,future", "sources", "source")


# -- the bench's SAT settings are SATConfig's fields ---------------------------------------------------------
def test_bench_parser_lists_exactly_satconfigs_fields():
    """Each SATConfig field is a flag (its default, choices and help the field's), a sweep, or held by the bench
    and named so in its help; a field added to SATConfig becomes a flag without a line here."""
    fields = [f.name for f in dataclasses.fields(SATConfig)]
    groups = [set(sat_flags()), set(SWEEPS), set(HELD), set(UNUSED)]
    assert sum(len(g) for g in groups) == len(fields) and set().union(*groups) == set(fields)
    p = parser()
    dests = {a.dest: a for a in p._actions}
    for name, flags in sat_flags().items():
        action = dests[f"sat_{name}"]
        assert flags[0] in action.option_strings and action.help.startswith(SATConfig.__dataclass_fields__[name]
                                                                            .metadata["help"][:30].replace("%", "%%"))
        if action.choices is not None:
            assert tuple(action.choices) == tuple(SATConfig.__dataclass_fields__[name].metadata["choices"])
    assert {"--attn-rate", "--selection", "--attn-unit", "--fused-scoring", "--rates", "--sources",
            "--forwards", "--layers"} <= {s for a in p._actions for s in a.option_strings}  # the flags as before
    assert all(name in p.format_help() for name in list(HELD) + list(UNUSED))


def test_bench_defaults_are_the_librarys():
    """`satlm bench` with no SAT flag measures what ships: every flag's default is SATConfig's, the forward sweep is
    SATConfig's forward, and the default sweeps include its rate and source; the runner's defaults agree."""
    from satlm.bench.runner import Bench, Variant, run

    library = SATConfig()
    args = parser().parse_args([])
    for name in sat_flags():
        assert getattr(args, f"sat_{name}") == getattr(library, name), name
    assert args.forwards == SWEEP_DEFAULTS["forward"] == library.forward
    assert library.source == args.sources.split(",")[0] and str(library.omission_rate) in args.rates.split(",")
    rates = _parse_list(args.rates, "rates", "omission_rate")
    assert bench_config(args, rates) == held(dataclasses.replace(library, omission_rate=max(rates)))
    assert held(library) == dataclasses.replace(library, **HELD)
    assert Variant("x", "current", 0.5).forward == library.forward
    assert inspect.signature(run).parameters["forwards"].default == (library.forward,)
    assert inspect.signature(Bench).parameters["sat"].default is None  # None: SATConfig()


def test_bench_flags_read_values_as_satconfig_does():
    args = parser().parse_args(["--attn-rate", "null", "--sat-layers", "[0, -1]", "--selection", "sample",
                                "--layers", "3", "--no-loss-tokens-dense", "--layer-rates", "[1, 1, 1]"])
    assert (args.sat_attn_omission_rate, args.sat_layers, args.sat_selection, args.layers) == (None, [0, -1],
                                                                                                "sample", 3)
    sat = bench_config(args, [0.25, 0.5])
    assert (sat.max_attn_rate, sat.layers, sat.layer_rates, sat.schedule) == (0.5, [0, -1], [1.0, 1.0, 1.0],
                                                                              "constant")
    with pytest.raises(SystemExit):
        parser().parse_args(["--attn-rate", "1.5"])
    with pytest.raises(SystemExit, match="loss_tokens_dense=True omits MLP channels only"):
        bench_config(parser().parse_args(["--loss-tokens-dense", "--attn-rate", "0.5"]), [0.5])


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

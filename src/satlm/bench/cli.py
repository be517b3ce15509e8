"""`satlm bench`: SAT against dense on this machine, with the FLOP ideal as the yardstick."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import yaml

from ..app.interleaved import ALLOCATOR_ENV  # glibc's allocator settings for timing, shared with satlm compare
from ..config import SATConfig, SATConfigError, forward_conflict
from ..fields import FieldSpec, field_problem, field_specs, read_value
from .settings import HELD, SWEPT, UNUSED, held, sat_variants


# The SAT variants' settings are SATConfig's fields, declared there: each field is a flag below (its help, choices,
# range and default are the field's), but for those the bench holds (runner.HELD, runner.UNUSED) and the three it
# sweeps, which take comma lists.
SWEEPS = {"omission_rate": ("--rates", "0.25,0.5,0.75"), "source": ("--sources", "current,history"),
          "forward": ("--forwards", None)}  # None: SATConfig's default
FLAG_NAMES = {"attn_omission_rate": ("--attn-rate", "--attn-omission-rate"),
              "layers": ("--sat-layers",)}  # --layers is the model's number of layers
SWEEP_DEFAULTS = {name: default if default is not None else str(field_specs(SATConfig)[name].default)
                  for name, (_, default) in SWEEPS.items()}


def sat_flags() -> dict[str, tuple[str, ...]]:
    """SATConfig field -> its `satlm bench` option strings, for every field that is neither held nor swept."""
    return {name: FLAG_NAMES.get(name, ("--" + name.replace("_", "-"),)) for name in field_specs(SATConfig)
            if name not in HELD and name not in UNUSED and name not in SWEEPS}


def _help(spec: FieldSpec, default, words: bool = False) -> str:
    """The field's help, its default (as YAML writes it) and, for a flag that takes any value, what it takes."""
    shown = default if isinstance(default, str) else yaml.safe_dump(default).splitlines()[0]
    return f"{spec.help} (default: {shown}{'; ' + spec.words() if words else ''})".replace("%", "%%")


def _reader(spec: FieldSpec):
    """argparse's type for a field's flag: the text read as YAML (0.5, null, [0, -1]), then as the field's type,
    then checked as the field declares."""
    def read(text: str):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        value = read_value(spec, value)
        problem = field_problem(spec, value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{text!r} {problem.words()}")
        return value

    read.__name__ = spec.name
    return read


def _add_sat_arguments(p: argparse.ArgumentParser) -> None:
    held = ", ".join(list(HELD) + list(UNUSED))
    group = p.add_argument_group(
        "SAT settings", "SATConfig's fields, with the library's defaults: the bench measures what ships unless told "
        "otherwise. Each variant runs at its own rate throughout (a constant schedule, and no SATCallback after the "
        f"optimizer step), so these fields do not apply: {held}.")
    specs = field_specs(SATConfig)
    for name, (flag, _) in SWEEPS.items():
        spec = specs[name]
        group.add_argument(flag, default=SWEEP_DEFAULTS[name], metavar=name.upper() + ",...",
                           help=_help(spec, SWEEP_DEFAULTS[name]).replace(
                               " (default:", f" A comma list: one variant per value, each {spec.words()}. (default:"))
    for name, flags in sat_flags().items():
        spec, dest = specs[name], f"sat_{name}"  # args.layers is the model's
        if bool in spec.kinds:
            group.add_argument(*flags, dest=dest, default=spec.default, action=argparse.BooleanOptionalAction,
                               help=_help(spec, spec.default))
        elif spec.choices is not None:
            group.add_argument(*flags, dest=dest, default=spec.default, choices=spec.choices,
                               help=_help(spec, spec.default))
        else:
            group.add_argument(*flags, dest=dest, default=spec.default, type=_reader(spec), metavar=name.upper(),
                               help=_help(spec, spec.default, words=True))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="satlm bench", description=__doc__)
    p.add_argument("--model", help="a local HF checkpoint, 'embedded' for satlm's base model, or a fetched model "
                                   "(smollm2-135m)")
    p.add_argument("--preset", choices=["tinyllama-1.1b", "llama2-7b", "llama2-13b"],
                   help="published model shape (random weights); combine with --layers to fit memory")
    p.add_argument("--per-layer", action="store_true", help="time one decoder layer only (the sparsified part)")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--layers", type=int, help="the model's number of decoder layers (SAT's layers: --sat-layers)")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--lora", type=int, metavar="R",
                   help="a LoRA adapter of rank R on every linear (peft; base weights frozen): LoRA-dense against "
                        "LoRA-SAT, the FLOP ideal counting the LoRA GEMMs; the kept-size model gets one too")
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--kept-size", action="store_true",
                   help="also time, interleaved, a dense model of each rate's kept size (kept heads and MLP "
                        "channels, all else equal): the speedup SAT would have with no overhead at all")
    p.add_argument("--compile", action="store_true",
                   help="time torch.compile'd steps (inductor; the model, or the layer with --per-layer), dense and "
                        "SAT alike; FLOPs and memory are counted on the eager step, which computes the same")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="draw speedup against rate beside the ideal (PNG)")
    _add_sat_arguments(p)
    return p


def _ensure_allocator_env(argv: list[str], device: str) -> None:
    if device != "cpu" or all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items()):
        return
    if os.environ.get("SATLM_BENCH_REEXEC"):
        return
    env = {**os.environ, **ALLOCATOR_ENV, "SATLM_BENCH_REEXEC": "1"}
    code = "import sys; from satlm.bench.cli import main; sys.exit(main(sys.argv[1:]))"
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-c", code, *argv], env)


def _parse_list(text: str, flag: str, name: str) -> list:
    """A sweep flag's comma list, each item read and checked as SATConfig's field `name` declares."""
    spec, out = field_specs(SATConfig)[name], []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = read_value(spec, yaml.safe_load(item))
        except yaml.YAMLError:
            value = item
        problem = field_problem(spec, value)
        if problem is not None:
            raise SystemExit(f"satlm bench: --{flag} has {item!r}, which {problem.words()}")
        out.append(value)
    if not out:
        raise SystemExit(f"satlm bench: --{flag} lists no value")
    return out


def bench_config(args: argparse.Namespace, rates: list[float]) -> SATConfig:
    """The SATConfig every SAT variant starts from: the flags' fields, at the largest rate of the sweep (layer_rates
    are checked against it when SAT is applied), with the fields the bench holds."""
    fields = {name: getattr(args, f"sat_{name}") for name in sat_flags()}
    if fields["layer_rates"] == "auto":
        raise SystemExit("satlm bench: --layer-rates auto is measured at the start of training (SATCallback, "
                         "measure_layer_rates); give the bench a list of factors, one per decoder layer")
    try:
        return held(SATConfig(**fields, omission_rate=max(rates), schedule=HELD["schedule"]))
    except SATConfigError as e:
        raise SystemExit(f"satlm bench: {e}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _ensure_allocator_env(argv, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .runner import PRESETS, Bench, Shape, build_model, kept_size_model, run, summarize, with_lora

    sources = _parse_list(args.sources, "sources", "source")
    forwards = tuple(_parse_list(args.forwards, "forwards", "forward"))
    rates = _parse_list(args.rates, "rates", "omission_rate")
    sat = bench_config(args, rates)
    if not sat_variants(sources, rates, forwards):
        raise SystemExit(f"satlm bench: no variant: --sources {args.sources} with --forwards {args.forwards} "
                         f"({forward_conflict('dense', 'history')})")
    shape = PRESETS[args.preset] if args.preset else Shape()
    for name in ("hidden_size", "intermediate_size", "heads", "kv_heads", "layers", "vocab_size"):
        if getattr(args, name) is not None:
            setattr(shape, name, getattr(args, name))
    if args.per_layer:
        shape.layers = 1
    model_path = args.model
    if model_path:  # embedded, a name `satlm fetch` knows, a .gguf file, or a folder
        from ..app.model_io import resolve_model_path

        model_path = resolve_model_path(model_path)
    dtype = getattr(torch, args.dtype)
    model = build_model(shape, model_path, dtype, device, args.seq_len, args.attn_implementation)
    cfg = model.config
    if args.lora is not None and args.lora < 1:
        raise SystemExit(f"satlm bench: --lora {args.lora}: the rank must be >= 1")
    base_model = model
    model = with_lora(model, args.lora)
    bench = Bench(model, per_layer=args.per_layer, batch_size=args.batch_size, seq_len=args.seq_len,
                  device=device, sat=sat, compile=args.compile)

    what = "one decoder layer" if args.per_layer else f"{cfg.num_hidden_layers} layers"
    what += f", LoRA r={args.lora} on every linear" if args.lora else ""
    print(f"satlm bench: {what}, d={cfg.hidden_size} f={cfg.intermediate_size} heads={cfg.num_attention_heads}"
          f"/{cfg.num_key_value_heads} vocab={cfg.vocab_size}, B={args.batch_size} T={args.seq_len} "
          f"{args.dtype} on {device} ({torch.get_num_threads()} threads), {args.repeats} interleaved repeats"
          + (", torch.compile (inductor)" if args.compile else ", eager"),
          flush=True)

    def progress(i, n):
        print(f"  round {i}/{n}", end="\r", file=sys.stderr, flush=True)

    kept_size = None
    if args.kept_size:
        kept_size = {r: Bench(with_lora(kept_size_model(base_model, r, sat.attn_unit), args.lora),
                              per_layer=args.per_layer,
                              batch_size=args.batch_size, seq_len=args.seq_len, device=device,
                              attn_unit=sat.attn_unit, compile=args.compile) for r in rates}
    variants = run(bench, sources, rates, args.warmup, args.repeats, progress, kept_size, forwards)
    dense, rows = summarize(variants, bench.tokens)
    print(" " * 20, end="\r", file=sys.stderr)
    print(format_table(dense, rows, device))
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "satlm bench " + " ".join(argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "device": device,
                    "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "shape": {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                  "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                  "layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size, "per_layer": args.per_layer,
                  "seq_len": args.seq_len, "batch_size": args.batch_size, "dtype": args.dtype,
                  "attn_unit": sat.attn_unit, "attn_implementation": cfg._attn_implementation,
                  "attn_rate": sat.attn_omission_rate, "selection": sat.selection, "lora": args.lora,
                  "compile": args.compile, "fused_scoring": sat.fused_scoring},
        # The settings every SAT variant shares (each row names its source, forward, rate, attn_rate and mlp_rate).
        "sat": {k: v for k, v in bench.sat.to_dict().items() if k not in SWEPT},
        "dense": dense,
        "results": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    if args.plot:
        plot(record, args.plot)
    return 0


def format_table(dense: dict, rows: list[dict], device: str) -> str:
    mem = "peak MiB" if device.startswith("cuda") else "saved MiB"
    kept = any("kept_size_speedup" in r for r in rows)
    head = f"{'source':<14} {'rate':>5} {'ideal':>6} {'speedup':>8} {'effic.':>7} {'tokens/s':>10} {mem:>10} {'spread':>7}"
    head += f" {'kept-size':>9}" if kept else ""
    lines = [head, "-" * len(head)]
    for r in [dense] + rows:
        name = r["source"] + ("/dense" if r.get("forward") == "dense" and r["source"] != "dense" else "")
        line = (f"{name:<14} {r['rate']:>5.2f} {r['ideal_speedup']:>6.2f} {r['speedup']:>7.2f}x "
                f"{r['efficiency']:>7.2f} {r['tokens_per_second']:>10,.0f} "
                f"{r['peak_memory_bytes'] / 2**20:>10.1f} {r['spread']:>7.1%}")
        if kept:
            line += f" {r['kept_size_speedup']:>8.2f}x" if "kept_size_speedup" in r else f" {'':>9}"
        lines.append(line)
    if kept:
        lines.append("kept-size: speedup of a dense model of the kept size (no SAT overhead at all), timed in the "
                     "same round-robin")
    return "\n".join(lines)


def plot(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    def label(r):
        return r["source"] + ("/dense" if r.get("forward") == "dense" else "")

    for i, source in enumerate(sorted({label(r) for r in record["results"]})):
        rows = sorted((r for r in record["results"] if label(r) == source), key=lambda r: r["rate"])
        rates = [r["rate"] for r in rows]
        color = f"C{i}"
        ax.plot(rates, [r["speedup"] for r in rows], "o-", color=color, label=f"{source} (measured)")
        ax.plot(rates, [r["ideal_speedup"] for r in rows], "--", color=color, label=f"{source} (FLOP ideal)")
        if all("kept_size_speedup" in r for r in rows):
            ax.plot(rates, [r["kept_size_speedup"] for r in rows], ":", color="grey",
                    label="dense model of the kept size" if i == 0 else None)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("omission rate")
    ax.set_ylabel("speedup over dense")
    shape = record["shape"]
    ax.set_title(f"satlm bench: d={shape['hidden_size']}, {'1 layer' if shape['per_layer'] else str(shape['layers']) + ' layers'}, "
                 f"{record['machine']['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""`satlm bench`: SAT against dense on this machine, with the FLOP ideal as the yardstick."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

# glibc's allocator returns big blocks to the OS and faults them in again, which inflates the dense
# baseline when variants are interleaved (measured: BENCHMARKS.md); glibc reads these only at process start.
# 32 MiB is glibc's largest mmap threshold, and blocks of that size or more (the logits of B=4 x T=256 x
# vocab 8192 in fp32 are exactly 32 MiB) were still mapped afresh on every dense step (~24,600 page faults a
# step, none in the SAT steps): MALLOC_MMAP_MAX_=0 serves every block from the heap, so no variant pays them.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184",
                 "MALLOC_MMAP_MAX_": "0"}


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
    p.add_argument("--layers", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--sources", default="current,history", help="comma list of current, history")
    p.add_argument("--rates", default="0.25,0.5,0.75", help="comma list of omission rates in (0, 1)")
    p.add_argument("--forwards", default="sparse",
                   help="comma list of sparse, dense (sat.forward; dense runs with source current only)")
    p.add_argument("--attn-rate", type=float,
                   help="attention omission rate of every variant (e.g. 0: heads off); default: the rate")
    p.add_argument("--selection", default="sample", choices=["sample", "topk", "random"])
    p.add_argument("--lora", type=int, metavar="R",
                   help="a LoRA adapter of rank R on every linear (peft; base weights frozen): LoRA-dense against "
                        "LoRA-SAT, the FLOP ideal counting the LoRA GEMMs; the kept-size model gets one too")
    p.add_argument("--attn-unit", default="head", choices=["head", "kv_group"])
    p.add_argument("--fused-scoring", default="auto", choices=["auto", "on", "off"],
                   help="sat.fused_scoring of every SAT variant (auto: compiled on CUDA with Triton)")
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


def _parse_list(text: str, name: str, cast, allowed=None):
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = cast(item)
        except ValueError:
            raise SystemExit(f"satlm bench: --{name} has {item!r}, not a {cast.__name__}")
        if allowed and value not in allowed:
            raise SystemExit(f"satlm bench: --{name} has {item!r}; allowed: {', '.join(allowed)}")
        out.append(value)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _ensure_allocator_env(argv, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .runner import PRESETS, Bench, Shape, build_model, kept_size_model, run, summarize, with_lora

    sources = _parse_list(args.sources, "sources", str, ("current", "history"))
    forwards = tuple(_parse_list(args.forwards, "forwards", str, ("sparse", "dense")))
    rates = _parse_list(args.rates, "rates", float)
    bad = [r for r in rates if not 0.0 < r < 1.0]
    if bad:
        raise SystemExit(f"satlm bench: --rates {bad} outside (0, 1)")
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
    if args.attn_rate is not None and not 0.0 <= args.attn_rate < 1.0:
        raise SystemExit(f"satlm bench: --attn-rate {args.attn_rate} outside [0, 1)")
    if args.lora is not None and args.lora < 1:
        raise SystemExit(f"satlm bench: --lora {args.lora}: the rank must be >= 1")
    base_model = model
    model = with_lora(model, args.lora)
    bench = Bench(model, per_layer=args.per_layer, batch_size=args.batch_size, seq_len=args.seq_len,
                  device=device, attn_unit=args.attn_unit, attn_rate=args.attn_rate, selection=args.selection,
                  compile=args.compile, fused_scoring=args.fused_scoring)

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
        kept_size = {r: Bench(with_lora(kept_size_model(base_model, r, args.attn_unit), args.lora),
                              per_layer=args.per_layer,
                              batch_size=args.batch_size, seq_len=args.seq_len, device=device,
                              attn_unit=args.attn_unit, compile=args.compile) for r in rates}
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
                  "attn_unit": args.attn_unit, "attn_implementation": cfg._attn_implementation,
                  "attn_rate": args.attn_rate, "selection": args.selection, "lora": args.lora,
                  "compile": args.compile, "fused_scoring": args.fused_scoring},
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

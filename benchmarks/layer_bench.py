"""Dense vs SAT time ratios for one Llama-style decoder layer, measured interleaved in one process.

    python benchmarks/layer_bench.py            # d=512, f=1408, 8 heads, T=256, B=8, fp32 (the default shape)
    python benchmarks/layer_bench.py --repeats 40 --json layer.json

Extra flags are passed to `satlm bench` (which re-executes itself with its allocator settings on the CPU:
satlm.bench.cli.ALLOCATOR_ENV). The whole-model and GPU variants are `satlm bench` without --per-layer.
"""

import sys

from satlm.bench.cli import main

DEFAULTS = ["--per-layer", "--hidden-size", "512", "--intermediate-size", "1408", "--heads", "8",
            "--kv-heads", "8", "--seq-len", "256", "--batch-size", "8", "--dtype", "float32",
            "--warmup", "3", "--repeats", "20"]

if __name__ == "__main__":
    sys.exit(main(DEFAULTS + sys.argv[1:]))

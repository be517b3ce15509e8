#!/usr/bin/env bash
# One-shot GPU check of satlm, from a fresh clone on a CUDA machine (no pip install, no network, no pytest):
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # one H200: about 3-4 minutes, at most 8 (SATLM_GPU_BUDGET)
#   bash benchmarks/gpu.sh --cpu [OUT_DIR]    # dry run of the same sections on the CPU, tiny shapes (< 2 minutes)
#
# Needs only what pyproject.toml requires (torch, transformers, ...); satlm is imported from src/ (PYTHONPATH).
# Sections, each timed and limited (`timeout`), each run whatever happened to the ones before it:
#   env       torch/transformers versions, GPUs, bf16 support                      -> env.txt, env.json
#   check     SAT against the masked dense reference (benchmarks/reference.py): fp32 (TF32 off), bf16 autocast
#             over fp32 weights, pure bf16; padded and unpadded; GQA 8/2 and MHA 4/4; current sparse/dense,
#             history; head and kv_group units (benchmarks/gpu_check.py)            -> check.txt, check.json
#   perlayer  one Llama-2-7B layer, bf16, B=4, T=2048, rates 0.25/0.5, kept-size   -> perlayer.{txt,json,png}
#   step      whole training steps: tinyllama-1.1b shape with 8 layers, bf16, B=4, T=2048 -> step.{txt,json,png}
#   fsdp2     FSDP2 against DDP on 2 GPUs (benchmarks/fsdp_check.py); skipped with 1 GPU -> fsdp2.{txt,json}
# At the end ONE summary table (section | status | seconds | key figures), also in OUT_DIR/summary.txt;
# OUT_DIR/sections.tsv holds the raw statuses. Exit status 0 when no section failed, 1 otherwise.
#
# Environment: OUT (the out dir when no argument is given; default gpu-results), PYTHON (default: the first of
# python and python3 that imports torch), SATLM_GPU_BUDGET (seconds for all sections; default 470 on the GPU, 110
# with --cpu: a section that would start with less than 10 s left is not run and counts as failed),
# SATLM_GPU_FAIL_SECTION (comma list of sections to fail on purpose, a test of this script), SATLM_GPU_FSDP_CPU=1
# (--cpu: run the fsdp2 section on 2 CPU processes with gloo instead of skipping it).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

mode=gpu
if [[ "${1:-}" == "--cpu" ]]; then
    mode=cpu
    shift
fi
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out" || exit 1
out="$(cd "$out" && pwd)"

# PYTHON, else the first of python and python3 that imports torch (on the GPU image python3 holds PyTorch, and a
# plain python, where there is one, may be another interpreter).
PY="${PYTHON:-}"
if [[ -z $PY ]]; then
    for candidate in python python3; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
            PY=$candidate
            break
        fi
    done
    PY="${PY:-python3}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_VERBOSITY=error

if [[ $mode == gpu ]]; then
    budget="${SATLM_GPU_BUDGET:-470}"
else
    budget="${SATLM_GPU_BUDGET:-110}"
fi
t_start=$(date +%s.%N)
sections="$out/sections.tsv"
printf 'section\tstatus\tseconds\trc\tnote\n' > "$sections"

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

record() {  # name status seconds rc note
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$sections"
}

skip() {  # name note
    echo "== $1: $2" | tee "$out/$1.txt"
    record "$1" skipped 0.0 - "$2"
}

run_section() {  # name limit_seconds command...  (an external command: timeout runs it)
    local name=$1 limit=$2
    shift 2
    local log="$out/$name.txt" left rc status note="" t0 secs
    left=$(awk -v b="$budget" -v e="$(elapsed "$t_start")" 'BEGIN { printf "%d", b - e }')
    if (( left < 10 )); then
        echo "== $name: not run, ${left}s left of the ${budget}s budget" | tee "$log"
        record "$name" FAIL 0.0 - "not run: budget of ${budget}s spent"
        return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit}s)"
    t0=$(date +%s.%N)
    if [[ ",${SATLM_GPU_FAIL_SECTION:-}," == *",$name,"* ]]; then
        timeout -k 10 "$limit" bash -c 'echo "failing on purpose (SATLM_GPU_FAIL_SECTION)"; exit 3' 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
        note="failed on purpose"
    else
        { printf '$ %s\n' "${*//$'\n'/ }" | cut -c1-300; timeout -k 10 "$limit" "$@" 2>&1; } | tee "$log"
        rc=${PIPESTATUS[0]}
    fi
    secs=$(elapsed "$t0")
    if [[ $rc == 0 ]]; then
        status=ok
    else
        status=FAIL
        if [[ $rc == 124 || $rc == 137 ]]; then
            note="timed out after ${limit}s"
        elif [[ -z $note ]]; then
            note="exit status $rc"
        fi
    fi
    echo "== $name: $status in ${secs}s${note:+ ($note)}"
    record "$name" "$status" "$secs" "$rc" "$note"
}

# The environment: versions, devices; fails on the GPU path when CUDA is missing.
env_script='
import json, platform, sys
info = {"mode": sys.argv[2], "python": platform.python_version(), "platform": platform.platform()}
import torch, transformers
info.update(torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda,
            cuda_available=torch.cuda.is_available(), device_count=torch.cuda.device_count())
try:
    import satlm
    info["satlm"] = satlm.__version__
except Exception as e:
    info["satlm"] = f"import failed: {e}"
if info["cuda_available"]:
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(info["device_count"])]
    info["bf16_supported"] = torch.cuda.is_bf16_supported()
    info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
else:
    x = torch.ones(4, dtype=torch.bfloat16)
    info["gpus"], info["bf16_supported"] = [], bool((x @ x).item() == 4)
for k, v in info.items():
    print(f"{k:15} {v}")
json.dump(info, open(sys.argv[1], "w"), indent=1)
ok = (info["cuda_available"] or sys.argv[2] == "cpu") and not str(info["satlm"]).startswith("import failed")
sys.exit(0 if ok else 1)
'

if [[ $mode == gpu ]]; then
    dev=(--device cuda)
    bench_perlayer=(--preset llama2-7b --per-layer --dtype bfloat16 --batch-size 4 --seq-len 2048 --warmup 3
                    --repeats 10)
    bench_step=(--preset tinyllama-1.1b --layers 8 --dtype bfloat16 --batch-size 4 --seq-len 2048 --warmup 3
                --repeats 10)
    limits=(30 150 120 150 90)  # env check perlayer step fsdp2 (fsdp2 only with 2+ GPUs)
else
    dev=(--device cpu)
    tiny=(--hidden-size 64 --intermediate-size 160 --heads 4 --kv-heads 2 --layers 2 --vocab-size 256
          --seq-len 32 --batch-size 2 --warmup 1 --repeats 2 --dtype float32 --threads 2)
    bench_perlayer=(--per-layer "${tiny[@]}")
    bench_step=("${tiny[@]}")
    limits=(30 60 40 40 60)
fi
common=(--kept-size --sources current,history --forwards sparse,dense --rates 0.25,0.5 --selection sample --attn-rate null)  # the setting the step targets were set for: heads and channels at the rate

echo "satlm GPU check ($mode mode), results in $out, budget ${budget}s"
run_section env "${limits[0]}" "$PY" -c "$env_script" "$out/env.json" "$mode"
run_section check "${limits[1]}" "$PY" benchmarks/gpu_check.py "${dev[@]}" --json "$out/check.json"
run_section perlayer "${limits[2]}" "$PY" -m satlm.bench.cli "${bench_perlayer[@]}" "${dev[@]}" "${common[@]}" \
    --json "$out/perlayer.json" --plot "$out/perlayer.png"
run_section step "${limits[3]}" "$PY" -m satlm.bench.cli "${bench_step[@]}" "${dev[@]}" "${common[@]}" \
    --json "$out/step.json" --plot "$out/step.png"

fsdp=(-m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/fsdp_check.py --json "$out/fsdp2.json")
if [[ $mode == gpu ]]; then
    gpus=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("device_count", 0))' \
           "$out/env.json" 2>/dev/null || timeout 60 "$PY" -c 'import torch; print(torch.cuda.device_count())' \
           2>/dev/null || echo 0)
    if (( gpus >= 2 )); then
        run_section fsdp2 "${limits[4]}" "$PY" "${fsdp[@]}" --device cuda
    else
        skip fsdp2 "skipped ($gpus GPU)"
    fi
elif [[ "${SATLM_GPU_FSDP_CPU:-0}" == 1 ]]; then
    run_section fsdp2 "${limits[4]}" env OMP_NUM_THREADS=1 "$PY" "${fsdp[@]}" --device cpu
else
    skip fsdp2 "skipped (cpu dry run)"
fi

echo
echo "== summary ($mode mode, $(elapsed "$t_start")s in all; details in $out)"
if ! "$PY" benchmarks/gpu_summary.py "$out" | tee "$out/summary.txt"; then
    column -t -s $'\t' "$sections" 2>/dev/null || cat "$sections"
fi
if cut -f2 "$sections" | grep -qx FAIL; then
    exit 1
fi
exit 0

#!/usr/bin/env bash
# On a CUDA machine with nothing but this repository and a Python that has torch and transformers:
#   bash benchmarks/gpu.sh [OUT_DIR]
# installs satlm without network, checks the sparse path against the masked dense reference on the GPU,
# then runs the tinyllama-1.1b preset in bf16 with SDPA and prints the table (about 5-8 minutes on one GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || python -m pip install -q --no-deps -e .
python - <<'PY'
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "device", torch.cuda.get_device_name(0))
PY
python benchmarks/gpu_check.py | tee "$out/gpu_check.txt"
# Whole training steps (forward, backward, fused AdamW): TinyLlama's shape with 8 of its 22 layers, B=4, T=2048.
python -m satlm.bench.cli --preset tinyllama-1.1b --layers 8 --dtype bfloat16 --device cuda \
    --batch-size 4 --seq-len 2048 --warmup 3 --repeats 10 --kept-size \
    --json "$out/tinyllama-bench.json" --plot "$out/tinyllama-bench.png" | tee "$out/tinyllama-bench.txt"
# One Llama-2-7B layer, B=4, T=2048, to isolate the sparsified part.
python -m satlm.bench.cli --preset llama2-7b --per-layer --dtype bfloat16 --device cuda \
    --batch-size 4 --seq-len 2048 --warmup 3 --repeats 10 --kept-size \
    --json "$out/llama2-7b-layer.json" | tee "$out/llama2-7b-layer.txt"
# FSDP2 through the Trainer (cannot run on CPU): train, checkpoint, resume; then compare with plain DDP.
fsdp='trainer_args={fsdp: true, fsdp_config: {version: 2, transformer_layer_cls_to_wrap: [LlamaDecoderLayer]}}'
torchrun --nproc_per_node 1 -m satlm.cli train demo-cpt output_dir="$out/fsdp2" overwrite=true max_steps=20 \
    save_steps=10 eval_steps=0 precision=bf16 progress=false "$fsdp" 2>&1 | tail -3 | tee "$out/fsdp2.txt"
torchrun --nproc_per_node 1 -m satlm.cli train demo-cpt output_dir="$out/fsdp2" max_steps=30 save_steps=10 \
    eval_steps=0 precision=bf16 progress=false "$fsdp" --resume 2>&1 | tail -3 | tee -a "$out/fsdp2.txt"

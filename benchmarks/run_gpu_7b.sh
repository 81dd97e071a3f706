#!/usr/bin/env bash
# The GPU measurements on a Qwen2.5-7B-shaped model (random bf16 weights, 2 of 28 decoder layers), in one
# go: the math layer's and the anchored factors' unit tests on CUDA, whole-model init against PEFT's LoRA and PiSSA, training
# step time (fp32 adapters, and under bf16 autocast as TRL runs them), the decomposition's stages and Krylov
# settings, and the Krylov solver's steps against a hindsight-perfect stop. JSON files land in OUTDIR (default
# benchmarks/results).
# Usage: bash benchmarks/run_gpu_7b.sh [OUTDIR]
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, peft, transformers; print('torch', torch.__version__, 'peft', peft.__version__, \
'transformers', transformers.__version__)"
timeout 60 python -m pytest -q -p no:cacheprovider tests/functional tests/tuner/test_anchor.py -k "not smollm2"
timeout 130 python benchmarks/init_speed.py --device cuda --shape qwen2.5-7b --layers 2 --with-full-svd \
    --extra-niter 0 --extra-oversample 8 --quality-layers 7 --out "$out/init_speed_7b_cuda.json"
timeout 80 python benchmarks/step_speed.py --device cuda --shape qwen2.5-7b --layers 2 --seq 2048 --batch 2 \
    --rounds 6 --steps 2 --out "$out/step_speed_7b_cuda.json"
timeout 80 python benchmarks/step_speed.py --device cuda --shape qwen2.5-7b --layers 2 --seq 2048 --batch 2 \
    --rounds 6 --steps 2 --autocast bf16 --out "$out/step_speed_7b_cuda_autocast.json"
timeout 80 python benchmarks/decompose_stages.py --device cuda --shape qwen2.5-7b --blocks 8 16 32 \
    --check-growths 1 1.25 1.5 --eigh-sizes 64 128 256 --profile q_proj gate_proj \
    --out "$out/decompose_stages_7b_cuda.json"
timeout 120 python benchmarks/krylov_convergence.py --device cuda --shape qwen2.5-7b --layers 0 \
    --matrices q_proj,gate_proj,down_proj --blocks 8 16 32 --out "$out/krylov_convergence_7b_cuda.json"

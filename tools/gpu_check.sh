#!/usr/bin/env bash
# The GPU checks (bf16, NCCL, throughput), on one CUDA node with raydino's dependencies installed:
#   1. tests/test_gpu.py (bf16, NCCL + DDP, device augmentation) and tests/test_streaming.py on the GPU;
#   2. `python -m raydino.pretrain` of the paper's ViT-S/16 (224 px, batch 64, bf16, NCCL) under Ray Train
#      on one GPU, with the crops made by Ray Data's CPU tasks and then on the GPU (augment.device);
#   3. `python -m raydino.bench gpu` (bf16 vs fp32 throughput, GPU vs CPU augmentation).
# Usage: tools/gpu_check.sh OUT_DIR     (what it measured lands in OUT_DIR; the README quotes it)
set -u
OUT=${1:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py tests/test_streaming.py 2>&1 \
  | tail -25 > "$OUT/pytest.txt"
tail -3 "$OUT/pytest.txt"
for aug in cpu cuda; do
  timeout 300 python3 -m raydino.pretrain --config vits16-paper --name "gpu-$aug" --storage "$OUT/runs" --no-probe \
    --workers 1 --set run.cpus_per_worker=4 --set data.node_labels=null --set "augment.device=$aug" \
    --set data.synthetic_n=4000 --set data.synthetic_size=256 --set train.epochs=2 --set optim.warmup_epochs=1 \
    --set train.log_every=20 --set train.checkpoint_every=1000000 > "$OUT/pretrain-$aug.txt" 2>&1
  echo "exit status $?" >> "$OUT/pretrain-$aug.txt"
  cat "$OUT"/runs/gpu-$aug/workers/rank0-*.json >> "$OUT/pretrain-$aug.txt" 2>/dev/null
  grep -E "^\[raydino\]|exit status|rank|Error|error" "$OUT/pretrain-$aug.txt" | tail -12
done
rm -rf "$OUT/runs"  # checkpoints of ViT-S with a 65536-way head: large, and not needed afterwards
timeout 200 python3 -m raydino.bench gpu --out "$OUT" > "$OUT/bench-gpu.txt" 2>&1
tail -8 "$OUT/bench-gpu.txt"

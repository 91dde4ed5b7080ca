#!/usr/bin/env bash
# The GPU checks (bf16, NCCL, throughput), on one CUDA node with raydino's dependencies installed.
#
#   tools/gpu_check.sh OUT_DIR perf   `bench gpu` only, in <= 6 minutes on an H200 (three runs, each under a timeout):
#       1. the eager rows (baseline, + fused AdamW, + deferred check, fp32 head logits, fp32) and the
#          official DINO recipe's step, FLOPs / TFLOP/s / MFU, numerics, GPU vs CPU augmentation
#          -> OUT_DIR/eager/gpu.json + .png            (timeout 130 s)
#       2. + torch.compile (beside the eager deferred row), compile time measured
#          -> OUT_DIR/compiled/gpu.json + .png         (timeout 115 s)
#       3. compiled at twice the batch (128 per GPU) -> OUT_DIR/batch-x2/gpu.json + .png (timeout 115 s)
#   tools/gpu_check.sh OUT_DIR [all]  everything (about 15 minutes):
#       1. tests/test_gpu.py (bf16, NCCL + DDP, device augmentation, no host sync in a deferred step,
#          torch.compile, the recipe's fp16 step) and tests/test_streaming.py on the GPU;
#       2. `python -m raydino.pretrain` of the paper's ViT-S/16 (224 px, batch 64, bf16, NCCL) under Ray Train
#          on one GPU, with the crops made by Ray Data's CPU tasks and then on the GPU (augment.device);
#       3. the two `bench gpu` runs of `perf`.
# What it measured lands in OUT_DIR; docs/performance.md quotes it.
set -u
OUT=${1:-gpu-check}
MODE=${2:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nproc

bench_gpu() {  # three runs, so that a slow compile costs its own rows only: 130 + 115 + 115 s at most
  timeout 130 python3 -m raydino.bench gpu --rows baseline fused_adamw deferred_check fp32_head_logits fp32 reference \
    --out "$OUT/eager" > "$OUT/bench-gpu-eager.txt" 2>&1
  echo "exit status $?" >> "$OUT/bench-gpu-eager.txt"
  tail -18 "$OUT/bench-gpu-eager.txt"
  timeout 115 python3 -m raydino.bench gpu --rows deferred_check compile --no-augment \
    --out "$OUT/compiled" > "$OUT/bench-gpu-compiled.txt" 2>&1
  echo "exit status $?" >> "$OUT/bench-gpu-compiled.txt"
  tail -10 "$OUT/bench-gpu-compiled.txt"
  timeout 115 python3 -m raydino.bench gpu --rows batch_x2 --set train.compile=true --no-augment \
    --out "$OUT/batch-x2" > "$OUT/bench-gpu-batch-x2.txt" 2>&1
  echo "exit status $?" >> "$OUT/bench-gpu-batch-x2.txt"
  tail -8 "$OUT/bench-gpu-batch-x2.txt"
}

if [ "$MODE" = perf ]; then
  bench_gpu
  exit 0
fi
timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py tests/test_streaming.py 2>&1 \
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
bench_gpu

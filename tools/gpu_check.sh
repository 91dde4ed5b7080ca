#!/usr/bin/env bash
# The GPU checks (bf16, NCCL, throughput), on one CUDA node with raydino's dependencies installed.
# Every mode writes at most 8 flat files into OUT_DIR (what a borrowed GPU machine hands back):
#   gpu-check.log       the console of every step
#   eager.json + .png   `bench gpu`: the eager rows (baseline, + fused AdamW, + deferred check, + fewer
#                       launches), the whole step as one CUDA graph, fp32 head logits, fp32, the official DINO
#                       recipe's step, FLOPs / TFLOP/s / MFU, kernel ops per step, numerics, GPU vs CPU
#                       augmentation                                                          (timeout 150 s)
#   compiled.json + .png  torch.compile, and compiled as CUDA graphs, beside the eager deferred row; compile
#                       times measured                                                      (timeout 200 s)
#   batch-x2.json + .png  compiled at twice the batch (128 per GPU), the recipe beside it    (timeout 130 s)
#   e2e.txt             the pretraining runs under Ray Train (their logs, rank 0's summary, nvidia-smi's
#                       utilisation and vmstat's CPU use sampled through each run) and the GPU tests
#
#   tools/gpu_check.sh OUT_DIR perf            `bench gpu` only, <= 8 minutes on an H200 (three runs)
#   tools/gpu_check.sh OUT_DIR lease [BUDGET]  one short loan of a GPU (BUDGET seconds in all, default 540):
#       1. the eager run of perf, with the whole step as one CUDA graph (batch-x2 and default compile were
#          measured on 2026-12-04: docs/performance.md);
#       2. the CUDA-graph tests of tests/test_gpu.py (at most 120 s);
#       3. `python -m raydino.pretrain` of the paper's ViT-S/16 (224 px, batch 64, bf16, NCCL) under Ray
#          Train on one GPU, crops made by Ray Data's CPU tasks on the node's other cores, with the faster
#          of the eager and CUDA-graph steps: the GPU's busy share in steady state and the cores it took;
#       4. in what is left: the compiled CUDA-graph row (reduce-overhead) and the rest of tests/test_gpu.py.
#   tools/gpu_check.sh OUT_DIR [all]           everything (about 15 minutes): tests/test_gpu.py and
#       tests/test_streaming.py, pretraining with the crops made on the CPU and on the GPU, then perf.
# GPU_CHECK_DRY=1 runs the same steps on the CPU with the smoke config (to test this script, not a GPU).
# docs/performance.md quotes what it measured.
set -u
OUT=${1:-gpu-check}
MODE=${2:-all}
BUDGET=${3:-540}
START=$SECONDS
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
E2E="$OUT/e2e.txt"
RUNS=$(mktemp -d)  # checkpoints of ViT-S with a 65536-way head: large, and not brought back

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  BENCH=(--device cpu --config smoke --steps 1 --warmup 1 --set model.head_use_bn=false)  # the paper's head: its cuda_graph row runs
  PRETRAIN=(--config smoke --set train.epochs=2 --set model.head_use_bn=false)
  GPU_FLAGS=()
else
  BENCH=()
  PRETRAIN=(--config vits16-paper --set data.synthetic_n=8000 --set data.synthetic_size=256 --set train.epochs=2
    --set optim.warmup_epochs=1 --set train.log_every=20 --set probe.monitor=off)  # the monitor's probe: ~40 s an epoch
  GPU_FLAGS=(--set run.cpus_per_worker=4)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
echo "cores: $(nproc)"

left() { echo $((BUDGET - (SECONDS - START))); }

bench() {  # NAME TIMEOUT ARGS...: one `bench gpu` run into OUT/NAME.json (+ .png)
  local name=$1 limit=$2
  shift 2
  echo "== bench gpu $name ($(date +%T), timeout ${limit} s)"
  timeout "$limit" python3 -m raydino.bench gpu "${BENCH[@]}" "$@" --json "$OUT/$name.json"
  echo "== bench gpu $name: exit status $?"
}

bench_eager() {
  bench eager 150 --rows baseline fused_adamw deferred_check fewer_launches cuda_graph fp32_head_logits fp32 reference
}

perf() {  # separate runs, so that a slow compile costs its own rows only: 130 + 200 (+ 130) s at most
  bench_eager
  bench compiled 200 --rows deferred_check compile compile_cudagraphs --no-augment
  # the recipe beside it: batch_x2's ratio to it within one process (the recipe runs eager, at the config's batch)
  [ "${1:-}" = no-x2 ] || bench batch-x2 130 --rows batch_x2 reference --set train.compile=true --no-augment
}

fastest_step() {  # the --set flags of the fastest finite step: the compiled run's rows and the eager run's CUDA graph
  python3 - "$OUT/compiled.json" "$OUT/eager.json" <<'EOF'
import json, sys
flags = {"deferred_check": "train.compile=false", "compile": "train.compile=true",
         "compile_cudagraphs": "train.compile=true train.compile_mode=reduce-overhead", "cuda_graph": "train.cuda_graph=true"}
rows = {}
for path in sys.argv[1:]:
    try:
        rows.update({k: v for k, v in json.load(open(path))["rows"].items() if k in flags and k not in rows})
    except Exception:
        pass
finite = [r for r in rows if rows[r].get("all_finite")]
best = max(finite, key=lambda r: rows[r]["images_per_s"]) if finite else "deferred_check"
print(" ".join(f"--set {f}" for f in flags[best].split()))
EOF
}

pretrain() {  # NAME TIMEOUT ARGS...: a pretraining run under Ray Train, sampled by nvidia-smi and vmstat
  local name=$1 limit=$2 smi=""
  shift 2
  {
    echo "== pretrain $name ($(date +%T), timeout ${limit} s): $*"
    if command -v nvidia-smi > /dev/null && [ "${GPU_CHECK_DRY:-0}" != 1 ]; then
      nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 250 > "$RUNS/smi-$name.csv" &
      smi=$!
    fi
    vmstat -t 1 > "$RUNS/vmstat-$name.txt" 2>&1 &
    local vm=$!
    timeout "$limit" python3 -m raydino.pretrain "${PRETRAIN[@]}" --name "$name" --storage "$RUNS" --no-probe --workers 1 \
      --set data.node_labels=null --set train.checkpoint_every=1000000 "${GPU_FLAGS[@]}" "$@" 2>&1
    echo "== pretrain $name: exit status $? ($(date +%T))"
    [ -n "$smi" ] && kill "$smi"
    kill "$vm"
    echo "-- rank 0's summary"
    cat "$RUNS/$name"/workers/rank0-*.json 2> /dev/null
    echo
    echo "-- nvidia-smi every 250 ms: timestamp, utilization.gpu, memory.used"
    cat "$RUNS/smi-$name.csv" 2> /dev/null
    echo "-- vmstat every second"
    cat "$RUNS/vmstat-$name.txt"
  } >> "$E2E"
  grep -E "^\[raydino\]|exit status|Error" "$E2E" | tail -8
}

gpu_tests() {  # TIMEOUT FILES...
  local limit=$1
  shift
  echo "== pytest $* ($(date +%T), timeout ${limit} s)" | tee -a "$E2E"
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE "$@" >> "$E2E" 2>&1
  echo "== pytest: exit status $?" | tee -a "$E2E"
  grep -E "^(FAILED|ERROR)| passed| failed" "$E2E" | tail -6
}

case "$MODE" in
  perf)
    perf
    ;;
  lease)
    # What a GPU must answer first: the eager rows beside the whole step as one CUDA graph (>= 2x?), then
    # the CUDA-graph tests (where a capture breaks, if it does), then the Ray Train run with the faster of
    # the eager and graph steps (GPU busy >= 90 %?), then what is left: the compiled CUDA-graph row
    # (default compile measured slower at batch 64 on 2026-12-04) and the other GPU tests.
    bench_eager
    first="whole_step or inside_a_cuda_graph or failed_capture or compiled_bf16 or never_waits"
    limit=$(($(left) - 300))
    [ "$limit" -gt 120 ] && limit=120
    if [ "$limit" -ge 30 ]; then
      gpu_tests "$limit" tests/test_gpu.py -k "$first"
    fi
    step=$(fastest_step)
    echo "fastest step: $step; $(left) s of $BUDGET left"
    limit=$(($(left) - 40))
    [ "$limit" -gt 200 ] && limit=200
    if [ "$limit" -ge 60 ]; then
      # shellcheck disable=SC2086  # $step is a list of flags
      pretrain e2e-cpu-crops "$limit" --set augment.device=cpu $step
    fi
    if [ "$(left)" -ge 140 ]; then
      bench compiled 130 --rows deferred_check compile_cudagraphs --no-augment
    fi
    limit=$(($(left) - 10))
    if [ "$limit" -ge 30 ]; then
      gpu_tests "$limit" tests/test_gpu.py -k "not ($first)"
    fi
    ;;
  all)
    gpu_tests 300 tests/test_gpu.py tests/test_streaming.py
    for aug in cpu cuda; do
      pretrain "e2e-$aug-crops" 300 --set "augment.device=$aug"
    done
    perf
    ;;
  *)
    echo "usage: tools/gpu_check.sh OUT_DIR [perf|lease [BUDGET_S]|all]" >&2
    exit 2
    ;;
esac
rm -rf "$RUNS"
echo "done in $((SECONDS - START)) s"
sleep 1  # lets tee write the last lines before the caller collects OUT_DIR

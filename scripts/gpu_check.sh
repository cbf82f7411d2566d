#!/usr/bin/env bash
# The GPU check, in one pass on a CUDA machine with python3 + torch (no Ray/Flower needed):
#   1. bench.cuda: joint-training step, TTP step and prediction latency, GPU vs this machine's CPU, fp32 vs bf16;
#   2. tests/test_cuda.py: training, prediction and TTP on CUDA against the CPU (CI has no GPU: they skip there);
#   3. Table 1 (baseline + transformer, one seed) trained and evaluated on the GPU, its step count sized from the
#      measured training step so that it fits TRAIN_SECONDS.
# Usage: scripts/gpu_check.sh DATA_URL OUT_DIR [TRAIN_SECONDS]
# Everything it prints is also under OUT_DIR; the Table 1 run is packed as OUT_DIR/table1_gpu.tgz.
set -uo pipefail
DATA=$1
OUT=$2
TRAIN_SECONDS=${3:-170}
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of this script without a GPU
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
t0=$(date +%s)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(), \
torch.cuda.is_bf16_supported())"; nproc; } 2>&1 | tee "$OUT/machine.txt"

timeout 90 $PY -m bench.cuda --out "$OUT/bench_cuda.json" --repeats 7 --no-cpu-paper 2>&1 | tee "$OUT/bench_cuda.log"
echo "[gpu_check] bench done at $(( $(date +%s) - t0 )) s"

timeout 90 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log"
echo "[gpu_check] tests done at $(( $(date +%s) - t0 )) s"

# Steps that fit TRAIN_SECONDS at the measured bf16 step time, with a 2x margin for the data loader and for
# the two models sharing the GPU; rounded to 100, between 2000 and 30000.
STEPS=$($PY - "$OUT/bench_cuda.json" "$TRAIN_SECONDS" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
ms = next(r["train_step_ms"] for r in rows if (r["config"], r["device"], r["amp"]) == ("synth_small", "cuda", "bf16"))
print(int(min(30000, max(2000, float(sys.argv[2]) * 1e3 / (2 * ms))) // 100 * 100))
EOF
) || STEPS=6000
STEPS=${MAX_STEPS:-$STEPS}  # MAX_STEPS: a fixed step count instead
echo "[gpu_check] table1 with train.max_steps=$STEPS" | tee "$OUT/table1_gpu.log"
timeout 330 $PY -m posettp.cli reproduce table1 --config configs/synth_small.yaml --device "$DEVICE" --seeds 1 --jobs 2 \
  --variants baseline,transformer --set "data.url=$DATA" --set "train.max_steps=$STEPS" --set data.num_workers=4 \
  --out "$OUT/table1_gpu" 2>&1 | tee -a "$OUT/table1_gpu.log"
tar czf "$OUT/table1_gpu.tgz" -C "$OUT" table1_gpu && rm -rf "$OUT/table1_gpu"
echo "[gpu_check] all done at $(( $(date +%s) - t0 )) s"

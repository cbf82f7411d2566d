#!/usr/bin/env bash
# Ray Train and Ray Serve on a GPU, in one pass on a CUDA machine whose python3 has torch but no Ray:
#   1. `ray start` (GPU detected) + `ray job submit -- python training/joint.py --gpus 1`: one worker, DDP over NCCL;
#   2. the same job with --workers 2 --gpus 1: two ranks sharing the GPU, over gloo (NCCL refuses a shared device,
#      which step 3 shows);
#   3. two processes forming an NCCL group on one device (scripts/nccl_shared_gpu_probe.py);
#   4. bench.ray_overhead --gpus 1: the plain loop on cuda:0 vs the same loop in one Ray Train GPU worker;
#   5. bench.serve_latency with the PoseModel replica on the GPU (--num-gpus 1), then on a CPU core, same machine.
# Ray, Serve and their dependencies travel as wheels (ray's Java jars and RLlib left out of its wheel to fit the
# 64 MiB a device call may carry): WHEELS names their folder. Usage: scripts/gpu_ray_check.sh WHEELS OUT [GPUS]
# GPUS=0 is a dry run of this script on a machine without a GPU (STEPS, BENCH_STEPS: fewer training steps).
set -uo pipefail
WHEELS=$1
OUT=$2
GPUS=${3:-1}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
t0=$(date +%s)
step() { echo "[gpu_ray_check] $1 at $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.log"; }

SITE=$(mktemp -d /tmp/site-XXXX)
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH"
rm -rf "$WHEELS"  # out of the job's working directory, which Ray uploads
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import sys, torch, ray; print(sys.version.split()[0], 'torch', torch.__version__, 'ray', ray.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; nproc; } 2>&1 | tee "$OUT/machine.txt"
step "installed"

DATA=/tmp/gpu_ray_synth
$PY -m posettp.cli synth --out $DATA --persons 20 --frames 16 --size 96 --seed 0 > "$OUT/synth.log" 2>&1 || exit 1
step "data"

RAY_TMP=$(mktemp -d /tmp/ray-XXXX)
ray start --head --port=6379 --num-gpus="$GPUS" --include-dashboard=true --dashboard-host=127.0.0.1 \
  --temp-dir="$RAY_TMP" --disable-usage-stats > "$OUT/ray_start.log" 2>&1 || { cat "$OUT/ray_start.log"; exit 1; }
step "ray started"
submit() {  # name, extra joint.py args...
  local name=$1; shift
  local steps=${STEPS:-400}
  timeout 120 ray job submit --address http://127.0.0.1:8265 --working-dir . -- "$PY" training/joint.py \
    --config configs/synth_small.yaml --set data.url=$DATA --set train.max_steps=$steps \
    --set train.report_every=$(( steps / 4 )) --storage /tmp/gpu_ray_runs --name "$name" "$@" \
    > "$OUT/job_$name.log" 2>&1
  echo "job $name rc $?"; grep -E "\[joint\]|step [0-9]+/|val_pck|Error|error" "$OUT/job_$name.log" | tail -12
  step "job $name"
}
submit one_gpu --gpus "$GPUS"
submit shared_gpu --gpus "$GPUS" --workers 2
ray stop --force > /dev/null 2>&1

if [ "$GPUS" -gt 0 ]; then
  timeout 40 $PY scripts/nccl_shared_gpu_probe.py > "$OUT/nccl_shared_device.log" 2>&1
  echo "nccl on a shared device: rc $?"; grep -E "Duplicate|rank [01]:|Error" "$OUT/nccl_shared_device.log" | head -4
  step "nccl probe"
fi

timeout 150 $PY -m bench.ray_overhead --gpus "$GPUS" --steps "${BENCH_STEPS:-40}" --rounds 2 --data $DATA \
  --json "$OUT/ray_overhead.json" > "$OUT/ray_overhead.log" 2>&1
echo "ray_overhead rc $?"; head -8 "$OUT/ray_overhead.log"
step "ray overhead"

for g in "$GPUS" 0; do
  timeout 100 $PY -m bench.serve_latency --num-gpus "$g" --persons 40 --rounds 1 --requests 200 --seconds 5 \
    > "$OUT/serve_gpus$g.json" 2> "$OUT/serve_gpus$g.log"; echo "serve --num-gpus $g rc $?"
  tail -9 "$OUT/serve_gpus$g.log"
  step "serve num_gpus=$g"
  [ "$GPUS" -gt 0 ] || break
done

#!/usr/bin/env bash
# Every bench at accelerator sizes on whatever device JAX finds, then one table of the figures.
#
#   bash bench/accelerator_suite.sh [OUTPUT_DIR] [--smoke]     # OUTPUT_DIR default /tmp/accelerator_suite
#   (--workdir=OUTPUT_DIR is the same, for `launch/tpu.py run --workdir=... -- bash bench/accelerator_suite.sh`)
#
# Steps, in order: the HAP-VR evaluation engine in float32, float32 at the default matmul precision (TF32 on a
# GPU, bf16 passes on a TPU) and bfloat16, each with the device's matmul rate and memory bandwidth, the f2f and
# CNN stages and the FIVR-200K projection (bench/hapvr_eval.py); the HAP-VR train step at the original's batch
# against the PyTorch step (bench/hapvr_train.py); the AVHash train step (bench/avhash.py); the four backbones
# (bench/backbones.py); coarse-to-fine search (bench/coarse_to_fine.py); the engine's precision options on the
# coarse-to-fine corpus (bench/precision.py). Each step runs under `timeout` and within the suite's budget
# (SUITE_BUDGET_S, default 450 s: under 8 minutes in all); a step that fails, times out or is skipped becomes a
# row saying so. OUTPUT_DIR receives logs/ (one log per step, steps.tsv, device.json), table.md and table.json.
#
# --smoke (or SUITE_SMOKE=1): tiny sizes on the CPU, a test of the plumbing; its figures mean nothing.
# SUITE_ONLY=step,step runs only those steps. SUITE_PRECISION_ARGS replaces the precision step's data, e.g.
# "--checkpoint=CKPT --dataset=fivr_5k --features=F.hdf5 --annotations=DIR" for a trained network.
# PyTorch baselines run on CUDA where the bench supports it and PyTorch has it, otherwise on the CPU; the HAP-VR
# train step at the original's batch skips its PyTorch side then (8e12 FLOPs a step: too slow on a CPU).
set -u -o pipefail

STEPS=(engine_float32 engine_tf32 engine_bfloat16 hapvr_train avhash backbones coarse_to_fine precision)
fail() { echo "error: $*" >&2; exit 2; }

out=/tmp/accelerator_suite
smoke=${SUITE_SMOKE:-0}
positional=0
for arg in "$@"; do
  case $arg in
    --smoke) smoke=1 ;;
    --workdir=*) out=${arg#--workdir=} ;;   # the output folder as `launch/tpu.py run` passes it
    -*) fail "unknown flag $arg (usage: bash bench/accelerator_suite.sh [OUTPUT_DIR] [--smoke])" ;;
    *) (( positional++ )) && fail "unexpected argument $arg: give one OUTPUT_DIR"; out=$arg ;;
  esac
done
[[ $smoke == 0 || $smoke == 1 ]] || fail "SUITE_SMOKE=$smoke: expected 0 or 1"
only=,${SUITE_ONLY:-$(IFS=,; echo "${STEPS[*]}")},
for name in ${SUITE_ONLY:+${SUITE_ONLY//,/ }}; do
  [[ " ${STEPS[*]} " == *" $name "* ]] || fail "SUITE_ONLY: unknown step '$name' (steps: ${STEPS[*]})"
done
budget=${SUITE_BUDGET_S:-450}
[[ $budget =~ ^[0-9]+$ ]] || fail "SUITE_BUDGET_S=$budget: expected a number of seconds"
[[ ! -e $out || -d $out ]] || fail "$out exists and is not a directory"

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
mkdir -p "$out" || fail "$out: cannot be created"
out=$(cd "$out" && pwd)
logs=$out/logs
rm -rf "$logs" "$out/table.md" "$out/table.json"   # an earlier run's table must not pass for this one's
mkdir -p "$logs"
work=$(mktemp -d) || exit 2
trap 'rm -rf "$work"' EXIT
# The benches' scratch files (features of several GB at full size) go into the work folder, removed at the end.
export TMPDIR=$work XLA_PYTHON_CLIENT_PREALLOCATE=false
# One compilation cache for the run, empty at its start unless JAX_COMPILATION_CACHE_DIR is set (cold starts
# stay cold): later steps reuse what earlier ones compiled, e.g. the float32 engine that the TF32 and bfloat16
# steps compare against.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$work/xla_cache}
PY=${PYTHON:-python}
if (( smoke )); then
  # the plumbing on the CPU; LLVM at -O0 compiles the many small programs faster
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES= XLA_FLAGS=--xla_backend_optimization_level=0
fi

start=$(date +%s)
read -r platform torch_cuda < <($PY -m bench.accelerator_suite --probe --logs="$logs" 2>"$logs/probe.log") \
  || { cat "$logs/probe.log" >&2; fail "JAX or PyTorch could not start (log: $logs/probe.log)"; }
echo "== device: $(tr -d '\n ' < "$logs/device.json")"
if [[ $platform == cpu && $smoke == 0 ]]; then
  echo "== no accelerator: the accelerator sizes will run into their time limits here; --smoke tests the plumbing"
fi

record() {   # step bench rc seconds limit setting reason command
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$logs/steps.tsv"
}
skip() {     # step bench setting reason
  [[ $only == *,$1,* ]] || return 0
  echo "== $1: skipped: $4"
  record "$1" "$2" skipped 0 0 "$3" "$4" ''
}
step() {     # step bench limit setting reason command...
  local name=$1 bench=$2 limit=$3 setting=$4 reason=$5
  shift 5
  [[ $only == *,$name,* ]] || return 0
  local left=$(( budget - $(date +%s) + start ))
  if (( left < 20 )); then
    echo "== $name: not run: the suite's ${budget} s budget is spent"
    record "$name" "$bench" not-run 0 "$limit" "$setting" "the suite's ${budget} s budget was spent" "$*"
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local t0 rc
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  rc=${PIPESTATUS[0]}
  local seconds
  seconds=$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $t0 }")
  record "$name" "$bench" "$rc" "$seconds" "$limit" "$setting" "$reason" "$*"
}

# ---------------------------------------------------------------------------------------------------- sizes
# Accelerator sizes and their estimated time on one H100 (about 8 s of start-up a bench; compilation dominates,
# the FLOPs below take seconds at tens of TFLOP/s): ~440 s in all, and the budget stops the suite before 8 min.
#   engine      32 queries x 512 videos, mean 72 frames: 7.6e12 useful FLOPs a pass, 0.7 GB of features, 14
#               length buckets to compile, 200 pairs of the per-pair PyTorch loop on the CPU: ~50 s; TF32 and
#               bfloat16 32 x 256 (half the FLOPs; their float32 reference hits the compilation cache): ~45 s each
#   train       the original's batch, 2 groups x 128 clips x 28 frames, D = 512: 8.0e12 FLOPs a step, 5 steps
#               a side: ~60 s
#   avhash      128 tuples, full size: 3.1e12 FLOPs a step, 7 a side (32 tuples when PyTorch is on the CPU): ~50 s
#   backbones   16 frames / 4 AST segments: 3.9e12 FLOPs a round, 5 rounds of PyTorch on the CPU: ~75 s
#   shortlist   8 queries x 400 videos (synthetic FIVR-like), 72 small scorer shapes to compile: ~60 s;
#               precision, 4 engine options on that corpus: ~50 s
engine_args=(--queries=32 --database=512 --mean_len=64 --baseline_pairs=200)
engine_low=(--queries=32 --database=256 --mean_len=64 --baseline_pairs=32)
engine_setting='32 x 512 videos, mean 64 frames'
low_setting='32 x 256 videos, mean 64 frames'
train_args=(--original_batch --steps=3 --warmup=1)
train_setting="the original's batch: 2 groups x 128 clips x 28 frames, D = 512"
avhash_batch=$([[ $torch_cuda == 1 || $platform == cpu ]] && echo 128 || echo 32)
avhash_args=(--batch_size="$avhash_batch" --steps=5 --warmup=1 --skip_ranking)
avhash_setting="full size, $avhash_batch tuples"
backbone_args=(--batch=16 --audio_batch=4 --steps=3)
c2f_args=(--queries=8 --database=400 --fractions=2,10 --timed_queries=4)
c2f_setting='8 queries x 400 videos, synthetic'
limits=(150 120 120 150 120 180 150 120)
if (( smoke )); then
  engine_args=(--queries=2 --database=4 --mean_len=8 --bucket_ratio=4 --project_queries=4)
  engine_low=("${engine_args[@]}")
  engine_setting='smoke: 2 x 4 videos, mean 8 frames'
  low_setting=$engine_setting
  train_args=(--sources=2 --groups=1 --frames=8 --dims=32 --teacher_dims=16 --steps=1 --warmup=0)
  train_setting='smoke: 1 group x 4 clips x 8 frames, D = 32'
  avhash_args=(--hidden=32 --heads=2 --intermediate=64 --batch_size=2 --steps=1 --warmup=0 --skip_ranking)
  avhash_setting='smoke: hidden 32, 2 tuples'
  backbone_args=(--arch=dino_vits16 --batch=1 --audio_batch=1 --steps=1)
  c2f_args=(--queries=1 --database=40 --fractions=10,50 --timed_queries=1 --candidates=pooled_regions
            --timed=pooled_regions)
  c2f_setting='smoke: 1 query x 40 videos, synthetic'
  limits=(120 120 120 120 120 120 120 120)
fi

# ---------------------------------------------------------------------------------------------------- steps
step engine_float32 hapvr_eval "${limits[0]}" "$engine_setting" '' \
  $PY bench/hapvr_eval.py "${engine_args[@]}"
step engine_tf32 hapvr_eval "${limits[1]}" "$low_setting" '' \
  $PY bench/hapvr_eval.py "${engine_low[@]}" --precision=default
step engine_bfloat16 hapvr_eval "${limits[2]}" "$low_setting" '' \
  $PY bench/hapvr_eval.py "${engine_low[@]}" --dtype=bfloat16 --precision=default
if [[ $torch_cuda == 0 && $platform != cpu ]]; then
  train_args+=(--skip_torch)
  train_reason="this PyTorch has no CUDA, and the batch's 8e12 FLOPs a step are too slow on the CPU"
fi
step hapvr_train hapvr_train "${limits[3]}" "$train_setting" "${train_reason:-}" \
  $PY bench/hapvr_train.py "${train_args[@]}"
step avhash avhash "${limits[4]}" "$avhash_setting" '' $PY bench/avhash.py "${avhash_args[@]}"
step backbones backbones "${limits[5]}" 'full size, random weights' '' \
  $PY bench/backbones.py "${backbone_args[@]}"
step coarse_to_fine coarse_to_fine "${limits[6]}" "$c2f_setting" '' \
  $PY -m bench.coarse_to_fine "${c2f_args[@]}" --workdir="$work/coarse_to_fine"
if [[ -n ${SUITE_PRECISION_ARGS:-} ]]; then
  # shellcheck disable=SC2086   # the user's flags, split as the shell splits them
  step precision precision "${limits[7]}" 'SUITE_PRECISION_ARGS' '' $PY bench/precision.py $SUITE_PRECISION_ARGS
elif [[ -f $work/coarse_to_fine/corpus/features.hdf5 ]]; then
  step precision precision "${limits[7]}" "${c2f_setting}, fresh network" '' $PY bench/precision.py \
    --features="$work/coarse_to_fine/corpus/features.hdf5" --annotations="$work/coarse_to_fine/corpus"
else
  skip precision precision 'the coarse-to-fine corpus' \
    'no corpus: the coarse_to_fine step did not run or failed (or give SUITE_PRECISION_ARGS)'
fi

echo "== table"
$PY -m bench.accelerator_suite --logs="$logs" --output="$out"

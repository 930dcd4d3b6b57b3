#!/usr/bin/env bash
# Every GPU check of the open goals in one device run (under 10 minutes on an H200), results under
# $OUT (default gpu_out/): CycleGAN training speed at 256² -- ours with our defaults (bf16 +
# channels_last) and in fp32 ("equal maths"), eager, compiled and compiled with CUDA graphs
# (`--compile-mode reduce-overhead`), batch 1 (and 4); the reference implementation in fp32 --,
# the classifier input pipeline's speed and the GPU tests; then, if time is left, side by side
# on the one GPU, paired-truth CycleGAN runs at 128² (the recipe: histogram prematch,
# λ_border 10; and the best so far, with d_augment 0.05, in bf16 and fp32).
# The 2026-12-04 run (docs/notebook/cyclegan.md) also ran the variants a CPU could
# not afford (second seed, ngf 32, ngf/ndf 64, batch 4): add them to `variants` below.
#
# Before the run, on a machine with a package index:  bash benchmarks/gpu_wheels.sh
# Then one device call with carry [".whl", ".ref"]; .ref/ holds the reference implementation's
# model files for benchmarks/bench_reference_cyclegan.py (its docstring lists them), and the
# reference step is skipped without it:
#
#   bash benchmarks/gpu_check.sh
#
# What comes back: $OUT/summary.txt (every benchmark's JSON line and every paired run's SSIM
# rows), $OUT/device.txt and $OUT/results.tgz (all logs and results.json files).
#
# GPU_CHECK_SIZE / GPU_CHECK_STEPS / GPU_CHECK_PAIRED_SIZE / GPU_CHECK_PAIRED_STEPS shrink it for
# a smoke test on a CPU (e.g. 32 / 1 / 32 / 10; GPU_CHECK_NO_INSTALL=1 leaves the environment as
# is, GPU_CHECK_NO_COMPILE=1 skips the compiled steps). GPU_CHECK_WARMUP: untimed steps before
# each timing (default 30). GPU_CHECK_SKIP="name name ...": steps to leave out (names as in the
# `step` lines below). GPU_CHECK_DEADLINE (seconds, default 560) is when the script must be done:
# each step has its own time limit, cut to what is left before the deadline, so one that hangs
# cannot eat the lease; a failed step is logged and the next one runs. Steps run in order of
# what they tell, so a short lease loses the least telling ones. A paired run cut short by the
# deadline is scored at its last checkpoint (results.json names it); with the compiled timings
# (several minutes) the paired stage usually has too little time left and is skipped, so run
# it as a second call with GPU_CHECK_NO_COMPILE=1. Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
failed=0
SIZE="${GPU_CHECK_SIZE:-256}"
STEPS="${GPU_CHECK_STEPS:-100}"
WARMUP="${GPU_CHECK_WARMUP:-30}"  # the reference's step time settles over its first ~50 steps
CLF_SIZE=$(( SIZE < 224 ? SIZE : 224 ))
CLF_N=$(( SIZE < 224 ? 32 : 256 ))
PAIRED_SIZE="${GPU_CHECK_PAIRED_SIZE:-128}"
PAIRED_STEPS="${GPU_CHECK_PAIRED_STEPS:-3000}"
DEADLINE="${GPU_CHECK_DEADLINE:-560}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
left() { echo $(( DEADLINE - SECONDS )); }

SKIP=" ${GPU_CHECK_SKIP:-} "

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/logs/NAME.log, count failures
  local name=$1 limit=$2
  shift 2
  if [[ "$SKIP" == *" $name "* ]]; then echo "== $name skipped (GPU_CHECK_SKIP)"; return; fi
  # never past the deadline: a step gets at most what is left (less 30 s for the summary)
  local room=$(( $(left) - 30 ))
  if [ "$room" -lt 20 ]; then echo "== $name skipped: the deadline is near"; return; fi
  [ "$limit" -gt "$room" ] && limit=$room
  echo "== $name ($(left) s left)"
  timeout "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/logs/$name.log"
  if [ "$rc" -ne 0 ]; then
    echo "!! $name failed (exit $rc)"
    failed=$((failed + 1))
  fi
}

if [ -d .whl ] && [ -z "${GPU_CHECK_NO_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Never --deps: the device has its own torch build. The checkout also goes on PYTHONPATH, so
# the steps still import it if the editable install is refused.
[ -z "${GPU_CHECK_NO_INSTALL:-}" ] && { python3 -m pip install -q --no-deps --no-build-isolation -e . \
  > "$OUT/logs/install.log" 2>&1 || echo "!! pip install -e . failed (logs/install.log)"; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  python3 - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
PY
  nproc
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# The GPU tests first (CUDA graphs in the whole training loop have never run on a GPU; the speed
# goals have been measured): they compile, about 2 minutes on an H200, and leave the GPU idle.
step pytest_gpu 240 python3 -m pytest -q -n 0 -m gpu -p no:cacheprovider -p no:logging tests
# Then speed, the most telling first, in case the deadline cuts the list.
bench=(python3 benchmarks/bench_cyclegan.py --size "$SIZE" --steps "$STEPS" --warmup "$WARMUP")
fp32=(--amp off --no-channels-last)
if [ -f .ref/models/cycle_gan_model.py ]; then
  gpu_flag=()
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && gpu_flag=(--gpu)
  step reference_fp32 90 python3 benchmarks/bench_reference_cyclegan.py --ref .ref --size "$SIZE" \
    --steps "$STEPS" --warmup "$WARMUP" "${gpu_flag[@]}"
fi
step cyclegan_bf16_cl 90 "${bench[@]}"
if [ -z "${GPU_CHECK_NO_COMPILE:-}" ]; then  # 1-2 minutes each, compilation included
  step cyclegan_bf16_cl_graphs 180 "${bench[@]}" --compile --compile-mode reduce-overhead
fi
step classifier 150 python3 benchmarks/bench_classifier.py --n "$CLF_N" --size "$CLF_SIZE" --steps 30 --batch-size 32
step cyclegan_fp32 90 "${bench[@]}" "${fp32[@]}"
step cyclegan_bf16_cl_b4 90 "${bench[@]}" --batch-size 4
if [ -z "${GPU_CHECK_NO_COMPILE:-}" ]; then
  step cyclegan_bf16_cl_compile 200 "${bench[@]}" --compile
  step cyclegan_fp32_graphs 180 "${bench[@]}" "${fp32[@]}" --compile --compile-mode reduce-overhead
  step cyclegan_fp32_compile 150 "${bench[@]}" "${fp32[@]}" --compile
fi
# Then the paired runs, all at once (each is launch-bound at batch 1).
variants=(  # name seed overrides... (after the recipe's loss.lambda_border=10)
  "recipe 0"
  "recipe_daug05 0 loss.d_augment=0.05"
  "recipe_daug05_fp32 0 loss.d_augment=0.05 train.amp=off"
)
if [ $(( $(left) - 60 )) -lt 240 ]; then
  echo "== paired runs skipped: $(( $(left) - 60 )) s is too little"
  variants=()
else
  step phantom 90 python3 -m cxr.cli.main phantom --preset nlm --out "$WORK/phantom" --size "$PAIRED_SIZE"
fi
budget=$(( $(left) - 60 ))
[ "${#variants[@]}" -gt 0 ] && echo "== paired runs at ${PAIRED_SIZE}², ${PAIRED_STEPS} steps, ${budget} s each"
pids=()
for v in "${variants[@]}"; do
  read -r name seed extra <<< "$v"
  (
    export OMP_NUM_THREADS=2  # several processes on the machine's cores; the GPU does the work
    log="$OUT/logs/paired_$name.log"
    paired=(python3 experiments/paired_proof.py --phantom "$WORK/phantom" --size "$PAIRED_SIZE" --seed "$seed"
            --prematch histogram)
    recipe=(-- loss.lambda_border=10 $extra)
    timeout "$budget" "${paired[@]}" --steps "$PAIRED_STEPS" --run-dir "$WORK/runs/$name" "${recipe[@]}" > "$log" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ] && ls "$WORK/runs/$name/checkpoints"/step-* > /dev/null 2>&1; then
      echo "cut short (exit $rc): scoring the last checkpoint" >> "$log"
      timeout 45 "${paired[@]}" --run "$WORK/runs/$name" "${recipe[@]}" >> "$log" 2>&1
    fi
    exit "$rc"
  ) &
  pids+=($!)
done
for p in "${pids[@]}"; do
  wait "$p" || { failed=$((failed + 1)); echo "!! a paired run failed or was cut short"; }
done

{
  for f in "$OUT"/logs/cyclegan_*.log "$OUT"/logs/reference_*.log; do
    [ -f "$f" ] && echo "$(basename "$f" .log): $(grep '^{' "$f" | tail -n 1)"
  done
  [ -f "$OUT/logs/classifier.log" ] && grep -E '^(densenet|\||\(ours)' "$OUT/logs/classifier.log"
  for v in "${variants[@]}"; do
    read -r name _ <<< "$v"
    echo "--- paired $name"
    grep -E "trained|cut short|(val|test) images|^method|^untranslated|^histogram|^cyclegan" \
      "$OUT/logs/paired_$name.log" | tail -n 20
    [ -f "$WORK/runs/$name/paired/results.json" ] \
      && cp "$WORK/runs/$name/paired/results.json" "$OUT/logs/paired_$name.results.json"
  done
  [ -f "$OUT/logs/pytest_gpu.log" ] && grep -E "passed|failed|error|skipped" "$OUT/logs/pytest_gpu.log" | tail -n 2
} > "$OUT/summary.txt" 2>&1
tar czf "$OUT/results.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
rm -rf "$WORK"
cat "$OUT/summary.txt"
echo "failed steps: $failed ($(left) s before the deadline)"
exit "$failed"

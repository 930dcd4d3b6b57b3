#!/usr/bin/env bash
# Every GPU check of the open goals in one device run (about 6 minutes on an H200), results
# under $OUT (default gpu_out/): the GPU tests, CycleGAN training speed at 256² (fp32 "equal
# maths" and our defaults: bf16 + channels_last), classifier speed, and the paired-truth
# CycleGAN run at 64² under bf16 (the structure term's bf16 fix, on the device where bf16 is
# the default).
#
# Before the run, on a machine with a package index:  bash benchmarks/gpu_wheels.sh
# Then one device call with carry [".whl", ".ref"]; .ref/ holds the reference implementation's
# model files for benchmarks/bench_reference_cyclegan.py (its docstring lists them), and the
# reference step is skipped without it:
#
#   bash benchmarks/gpu_check.sh
#
# GPU_CHECK_SIZE / GPU_CHECK_STEPS / GPU_CHECK_PAIRED_STEPS shrink it for a smoke test on a CPU
# (e.g. 32 / 1 / 20). Each step has its own time limit, so one that hangs cannot eat the lease;
# a failed step is logged and the next one runs. Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=0
SIZE="${GPU_CHECK_SIZE:-256}"
STEPS="${GPU_CHECK_STEPS:-30}"
CLF_SIZE=$(( SIZE < 224 ? SIZE : 224 ))
CLF_N=$(( SIZE < 224 ? 32 : 256 ))
PAIRED_STEPS=()
[ -n "${GPU_CHECK_PAIRED_STEPS:-}" ] && PAIRED_STEPS=(--steps "$GPU_CHECK_PAIRED_STEPS")

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, count failures
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 4 "$OUT/$name.log"
  if [ "$rc" -ne 0 ]; then
    echo "!! $name failed (exit $rc)"
    failed=$((failed + 1))
  fi
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Never --deps: the device has its own torch build. The checkout also goes on PYTHONPATH, so
# the steps still import it if the editable install is refused.
python3 -m pip install -q --no-deps --no-build-isolation -e . || echo "!! pip install -e . failed"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - > "$OUT/device.txt" <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
EOF
cat "$OUT/device.txt"

step pytest_gpu 240 python3 -m pytest -q -n 0 -m gpu -p no:cacheprovider
step cyclegan_fp32 150 python3 benchmarks/bench_cyclegan.py --size "$SIZE" --steps "$STEPS" --amp off --no-channels-last
step cyclegan_bf16_cl 150 python3 benchmarks/bench_cyclegan.py --size "$SIZE" --steps "$STEPS"
if [ -f .ref/models/cycle_gan_model.py ]; then
  gpu_flag=()
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && gpu_flag=(--gpu)
  step reference_fp32 150 python3 benchmarks/bench_reference_cyclegan.py --ref .ref --size "$SIZE" \
    --steps "$STEPS" --warmup 5 "${gpu_flag[@]}"
fi
step classifier 150 python3 benchmarks/bench_classifier.py --n "$CLF_N" --size "$CLF_SIZE" --steps "$STEPS" --batch-size 32
step phantom64 120 python3 -m cxr.cli.main phantom --preset nlm --out "$OUT/phantom64" --size 64 --overwrite
step paired64_bf16 300 python3 benchmarks/cyclegan_paired.py --phantom "$OUT/phantom64" \
  --run-dir "$OUT/paired64" "${PAIRED_STEPS[@]}"
rm -rf "$OUT/phantom64" "$OUT/paired64/paired/MontgomerySet_a2b" "$OUT/paired64/checkpoints"
echo "failed steps: $failed"
exit "$failed"

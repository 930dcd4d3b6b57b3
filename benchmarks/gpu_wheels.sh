#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels the lent GPU machine lacks (it has torch,
# torchvision, numpy, scipy, pandas, scikit-learn, tensorboard, safetensors, torchmetrics,
# matplotlib, pillow, pyyaml, tqdm, but none of these), for its Python 3.12, into .whl/ (ignored
# by git). benchmarks/gpu_check.sh installs them there; name .whl in the device run's carry.
#
#   bash benchmarks/gpu_wheels.sh            # then: du -sh .whl (must stay well under 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_34_x86_64; do
  platforms+=(--platform "$p")
done
# Our dependencies missing there, and what they need that is missing too.
for pkg in kornia kornia_rs lpips pytorch-fid torchxrayvision pydicom nibabel openpyxl et-xmlfile isal; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${platforms[@]}" --platform any -d .whl "$pkg"
done
ls -1 .whl
du -sh .whl

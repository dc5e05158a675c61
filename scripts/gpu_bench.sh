#!/usr/bin/env bash
# The GPU figures that ../shared/device/check.sh does not take: the CUDA tests alone, then bench.py on CUDA in each
# precision (auto: frozen forwards bf16; fp32; fp32 with TF32 matmuls through PyTorch's cuBLAS override, no code
# change), for the README's GPU column. Run on a device machine from the project's root, after
#   bash ../shared/device/prepare.sh                      (here: fills .device/ with the wheels the GPU image lacks)
# as a device command of its own after "bash .device/check.sh" (each within the 10-minute limit), carry
# [".device"]. Logs and bench JSON go to $OUT: gpu_bench.txt and bench-{auto,fp32,tf32}.json (with check.sh's
# three files, 7 of the 8 that come back); each JSON says whether TF32 matmuls were on (machine.tf32_matmul).
# Dry run on a CPU: DEVICE=cpu CLIPS=ViT-B-16 EXTRA=--quick bash scripts/gpu_bench.sh
set -uo pipefail
OUT=${OUT:-/tmp/device-out}; DEVICE=${DEVICE:-cuda}; CLIPS=${CLIPS:-ViT-B-16 ViT-L-14}; EXTRA=${EXTRA:-}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_bench.txt") 2>&1
if [ -d .device/whl ]; then   # as check.sh installs them (again if check.sh ran first: a few seconds)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/.device/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
quiet() { tr '\r' '\n' | grep -v '%|'; }

echo "=== CUDA tests"
python3 -m pytest -q tests/test_cuda.py -p no:cacheprovider -rs 2>&1 | tail -15

for run in auto fp32 tf32; do
  precision=$run; [ "$run" = tf32 ] && precision=fp32
  echo "=== bench.py --device $DEVICE --precision $precision ($run) --clips $CLIPS"
  S=$(date +%s)
  TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=$([ "$run" = tf32 ] && echo 1 || echo 0) \
    python3 bench.py --device "$DEVICE" --precision "$precision" --clips $CLIPS --out "$OUT/bench-$run.json" $EXTRA \
    2>&1 | quiet | tail -24
  echo "=== $run: $(( $(date +%s) - S )) s"
done

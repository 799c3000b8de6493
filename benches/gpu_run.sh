#!/usr/bin/env bash
# One call on a lent GPU machine (see the device tool's README): install the carried wheels (.whl/: diffusers,
# importlib_metadata), build fastdiff with its CUDA module, run the GPU tests and the GPU benchmarks, and leave
# logs + result tables in one archive, $OUT/gpu_run-<parts>.tar.gz (the device returns at most 8 files).
# Usage: bash benches/gpu_run.sh [tests|step|model|pipeline|all]...   (one call per part fits the 10-minute limit;
# see benches/NOTES.md, "A GPU session, planned")
set -uo pipefail
FINAL=${OUT:-/tmp/fastdiff-out}
OUT=$(mktemp -d)  # everything is written here, then archived into $FINAL
mkdir -p "$FINAL"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/env.txt"
if ! python3 -c "import fastdiff._C_cuda" 2>/dev/null; then
  ( time FASTDIFF_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . ) 2>&1 | tail -15 | tee "$OUT/build.log"
fi
python3 -m fastdiff info 2>&1 | tee -a "$OUT/env.txt"
export FASTDIFF_BENCH_SAVE=1
for what in "${@:-all}"; do
  case "$what" in
    tests|all) python3 -m pytest -q -p no:cacheprovider -rs -m "cuda or ext" tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;&
    step|all) python3 -m pytest -q -p no:cacheprovider benches/bench_step.py --benchmark-only \
                --benchmark-json="$OUT/bench_step.json" 2>&1 | tee "$OUT/bench_step.log" | tail -60 ;;&
    model|all) [ -f benches/bench_model.py ] && python3 -m pytest -q -p no:cacheprovider benches/bench_model.py \
                --benchmark-only 2>&1 | tee "$OUT/bench_model.log" | tail -40 ;;&
    pipeline|all) [ -f benches/bench_pipeline.py ] && python3 -m pytest -q -p no:cacheprovider \
                benches/bench_pipeline.py --benchmark-only 2>&1 | tee "$OUT/bench_pipeline.log" | tail -30 ;;&
    *) ;;
  esac
done
mkdir -p "$OUT/results" && cp benches/results/*.md "$OUT/results/" 2>/dev/null
parts=$(IFS=-; echo "${*:-all}")
tar czf "$FINAL/gpu_run-$parts.tar.gz" -C "$OUT" . && echo "archived: $FINAL/gpu_run-$parts.tar.gz"

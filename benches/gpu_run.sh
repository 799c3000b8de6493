#!/usr/bin/env bash
# One call on a lent GPU machine (see the device tool's README): install the carried wheels (.whl/: diffusers,
# importlib_metadata), build fastdiff with its CUDA module, run the GPU tests and the GPU benchmarks, and leave
# logs + result tables in one archive, $OUT/gpu_run-<parts>.tar.gz (the device returns at most 8 files).
# Usage: bash benches/gpu_run.sh [tests|sanitize|step|model|pipeline|all]...   (one call per part fits the 10-minute limit;
# see benches/NOTES.md, "A GPU session, planned")
set -uo pipefail

# Prerequisites first, all of them, before anything slow: without nvcc the build quietly leaves out _C_cuda, and
# without a GPU torch cannot see, every compiled-module test skips, so a run would "pass" having measured nothing.
fail() {
  echo "gpu_run.sh: cannot run: $1" >&2
  shift
  for line in "$@"; do echo "  $line" >&2; done
  exit 2
}
problems=()
command -v nvcc >/dev/null 2>&1 || problems+=("nvcc is not on PATH (the CUDA toolkit builds fastdiff._C_cuda)")
if ! command -v nvidia-smi >/dev/null 2>&1; then
  problems+=("nvidia-smi is not on PATH (no NVIDIA driver?)")
elif ! smi=$(nvidia-smi -L 2>&1) || [ -z "$smi" ]; then
  problems+=("nvidia-smi -L failed: ${smi:-no output}")
fi
command -v python3 >/dev/null 2>&1 || problems+=("python3 is not on PATH")
[ ${#problems[@]} -eq 0 ] || fail "missing prerequisites" "${problems[@]}"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# Checked after the carried wheels are installed, since they may provide some of these modules.
# setuptools + pybind11: the --no-build-isolation build below needs both in this environment.
py_problems=$(python3 - <<'PY' 2>&1
import importlib
mods = {}
for name in ("setuptools", "pybind11", "torch", "triton"):
    try:
        mods[name] = importlib.import_module(name)
    except Exception as e:
        print(f"python3 cannot import {name}: {type(e).__name__}: {e}")
torch = mods.get("torch")
if torch is not None and not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda}): "
          "a CPU-only torch, or a driver too old for it")
PY
) || py_problems="${py_problems:+$py_problems
}the prerequisite check itself failed"
if [ -n "$py_problems" ]; then
  mapfile -t lines <<<"$py_problems"
  fail "missing prerequisites" "${lines[@]}"
fi

FINAL=${OUT:-/tmp/fastdiff-out}
OUT=$(mktemp -d)  # everything is written here, then archived into $FINAL
mkdir -p "$FINAL"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/env.txt"
if ! python3 -c "import fastdiff._C_cuda" 2>/dev/null; then
  ( time FASTDIFF_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . ) 2>&1 | tail -15 | tee "$OUT/build.log"
fi
python3 -m fastdiff info 2>&1 | tee -a "$OUT/env.txt"
# A build that silently left out the CUDA module would make every compiled-module test skip: stop here instead.
if ! err=$(python3 -c "import fastdiff._C_cuda" 2>&1); then
  tar czf "$FINAL/gpu_run-build-failed.tar.gz" -C "$OUT" . 2>/dev/null
  fail "fastdiff._C_cuda does not load after the build (logs: $FINAL/gpu_run-build-failed.tar.gz)" \
    "${err##*$'\n'}" "see 'python3 -m fastdiff info' above and the build log"
fi
export FASTDIFF_BENCH_SAVE=1
# FASTDIFF_PART_TIMEOUT=S stops each part's pytest after S seconds: the archive is written at the end, so a part that
# overran a device call's limit would otherwise take the logs of the parts before it down with it. SIGINT first: pytest
# stops like a Ctrl-C and still writes its ratio table and benchmark JSON for the tests that ran (SIGKILL 20 s later).
part_limit=${FASTDIFF_PART_TIMEOUT:-0}
limited() { if [ "$part_limit" -gt 0 ]; then timeout -s INT -k 20 "$part_limit" "$@"; else "$@"; fi; }
for what in "${@:-all}"; do
  case "$what" in
    tests|all) limited python3 -m pytest -q -p no:cacheprovider -rs -m "cuda or ext" tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;&
    step|all) limited python3 -m pytest -q -p no:cacheprovider benches/bench_step.py --benchmark-only \
                --benchmark-json="$OUT/bench_step.json" 2>&1 | tee "$OUT/bench_step.log" | tail -60 ;;&
    model|all) [ -f benches/bench_model.py ] && limited python3 -m pytest -q -p no:cacheprovider benches/bench_model.py \
                --benchmark-only --benchmark-json="$OUT/bench_model.json" 2>&1 | tee "$OUT/bench_model.log" | tail -40 ;;&
    sanitize|all) if ! command -v compute-sanitizer >/dev/null 2>&1; then
                  echo "compute-sanitizer is not on PATH: sanitize part skipped" | tee "$OUT/sanitize.log"
                else
                  for tool in memcheck racecheck; do
                    limited compute-sanitizer --tool "$tool" --error-exitcode 1 python3 benches/gpu_sanitize.py \
                      2>&1 | tail -40 | tee -a "$OUT/sanitize.log"
                    echo "$tool: exit ${PIPESTATUS[0]}" | tee -a "$OUT/sanitize.log"
                  done
                fi ;;&
    pipeline|all) [ -f benches/bench_pipeline.py ] && limited python3 -m pytest -q -p no:cacheprovider \
                benches/bench_pipeline.py --benchmark-only 2>&1 | tee "$OUT/bench_pipeline.log" | tail -30 ;;&
    *) ;;
  esac
done
mkdir -p "$OUT/results" && cp benches/results/*.md "$OUT/results/" 2>/dev/null
parts=$(IFS=-; echo "${*:-all}")
tar czf "$FINAL/gpu_run-$parts.tar.gz" -C "$OUT" . && echo "archived: $FINAL/gpu_run-$parts.tar.gz"

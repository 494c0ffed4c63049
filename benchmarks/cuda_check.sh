#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA device (docs/performance.md, "On a GPU"):
#
#   bash benchmarks/cuda_check.sh [OUT_DIR]        (OUT_DIR: default $OUT, else ./cuda-check)
#
# Phases, each with its own time limit and its output in OUT_DIR/<phase>.txt, the least
# measured first, so that a run cut short still reports what it finished. The script's own
# lines (phase, exit status, seconds) go to stdout and OUT_DIR/summary.txt. Seconds are from
# the H200 run of 2026-12-04 (docs/benchmarks/cuda-h200-summary-9e6ffa9.txt):
#   env             the GPU, driver and PyTorch (6 s)
#   tests           tests/test_cuda.py: model, trainer, compiler and pipeline on the GPU (90 s)
#   mnist-graphs    mnist-captions compiled with CUDA graphs (--compile-mode reduce-overhead);
#                   its training graph alone compiled in 164 s; limit 420 s
#   mnist-eager     throughput.py, mnist-captions, eager fp32 and bf16 against the naive
#                   reference (20 s)
#   coco32-eager    the same for coco32 (22 s)
#   mnist-compiled  mnist-captions compiled in the default mode (no CUDA graphs); not in the
#                   default PHASES, as it needs about as long as mnist-graphs
# The default phases' limits add up to 810 s: give the whole run what the machine allows
# and the last phases are the ones cut.
# PHASES="tests mnist-eager" runs a subset; PYTHON picks the interpreter (default python3);
# DEVICE=cpu THROUGHPUT_ARGS=--smoke tries the script itself on a machine without a GPU.
set -u
out=$(realpath -m "${1:-${OUT:-cuda-check}}")
mkdir -p "$out"
cd "$(dirname "$0")/.." || exit 1  # the repository's root
python=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
phases=${PHASES:-env tests mnist-graphs mnist-eager coco32-eager}
# shellcheck disable=SC2206  # THROUGHPUT_ARGS: words to split
throughput=("$python" benchmarks/throughput.py --device "${DEVICE:-cuda}" --repeats 7 ${THROUGHPUT_ARGS:-})

run_phase() {  # name, time limit in seconds, command…
    local name=$1 limit=$2
    shift 2
    case " $phases " in *" $name "*) ;; *) return ;; esac
    echo "== $name (limit ${limit}s): $*" | tee -a "$out/summary.txt"
    local start=$SECONDS
    { echo "\$ $*"; timeout -k 15 "$limit" "$@"; echo "rc $?"; } > "$out/$name.txt" 2>&1
    echo "== $name: $(tail -n 1 "$out/$name.txt"), $((SECONDS - start)) s" | tee -a "$out/summary.txt"
}

run_phase env 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv; "$1" -c "import torch, sys; print(sys.version); print(torch.__version__, \
    torch.version.cuda, torch.cuda.get_device_name(), torch.backends.cuda.matmul.allow_tf32)"; nproc' \
    _ "$python"
run_phase tests 150 "$python" -m pytest tests/test_cuda.py -p no:cacheprovider -q -rfEs
run_phase mnist-graphs 420 "${throughput[@]}" --preset mnist-captions --compile --compile-mode reduce-overhead
run_phase mnist-eager 120 "${throughput[@]}" --preset mnist-captions --precision both
run_phase coco32-eager 90 "${throughput[@]}" --preset coco32 --precision both
run_phase mnist-compiled 420 "${throughput[@]}" --preset mnist-captions --compile
for f in "$out"/*.txt; do echo "---- $f"; grep -E "^(train|sample|compile|library|naive|matmul|targets)|EQUAL|DIFFERENT|PASSED|FAILED|passed|failed|skipped|Error|^rc " "$f" | head -40; done

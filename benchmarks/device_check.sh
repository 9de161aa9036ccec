#!/usr/bin/env bash
# The GPU checks of the metric engine and the training options, in one script (< 8 min on
# one GPU): the `gpu` tests, the three benchmarks at a scale that fits, and a few epochs of
# the paper's MNIST recipe on MNIST-shaped data (epoch time, metric-pass time, peak GPU
# memory). Ends with one summary table. On a machine without CUDA it says so and exits 0.
#
#   bash benchmarks/device_check.sh            # PYTHON=... to pick the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "device_check: no CUDA GPU present (torch.cuda.is_available() is False): nothing to check here."
    exit 0
fi
"$PY" -c 'import torch; print("device_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)'

logs=$(mktemp -d)
declare -a names statuses seconds figures
fail=0

step() {  # step NAME LIMIT_SECONDS FIGURE_REGEX COMMAND...
    local name=$1 limit=$2 regex=$3
    shift 3
    local t0=$SECONDS rc=0
    echo "=== $name: $*"
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1 || rc=$?
    tail -n 25 "$logs/$name.log"
    names+=("$name")
    seconds+=($((SECONDS - t0)))
    if [ "$rc" -eq 0 ]; then statuses+=("ok"); else statuses+=("FAIL rc=$rc"); fail=1; fi
    figures+=("$(grep -E "$regex" "$logs/$name.log" | tail -n 1 | cut -c1-110)")
}

step gpu-tests 90 "passed|failed" "$PY" -m pytest -m gpu -q -p no:cacheprovider
step bench_metrics 100 "^\(c\)" "$PY" benchmarks/bench_metrics.py --scale 1 --repeat 2
step bench_train 90 "metrics / baseline" "$PY" benchmarks/bench_train.py --scale 0.5 --rounds 2
step bench_scaling 120 "^ +(n|d|layers|k) +-?[0-9.]+ +-?[0-9.]+ " \
    "$PY" benchmarks/bench_scaling.py --full --repeat 1 --png "$logs/bench_scaling.png"
step mnist-recipe 60 "^SUMMARY" "$PY" benchmarks/device_train.py --epochs 3 --n 60000

# --- ddp (issue 17): NCCL on 2 GPUs, torchrun 2 ranks vs 1 process (docs/distributed.md) -------
ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "${ngpu:-0}" -ge 2 ]; then
    step ddp-nccl 150 "max rel diff" \
        "$PY" benchmarks/bench_ddp.py --nproc 2 --epochs 3 --device cuda
else
    echo "ddp-nccl: $ngpu GPU visible; the NCCL 2-rank check needs 2: single-GPU checks only"
fi
# --- end ddp ---------------------------------------------------------------------------------

echo
echo "device_check summary (logs in $logs)"
printf '%-14s %-10s %6s  %s\n' step status sec "key figure"
for i in "${!names[@]}"; do
    printf '%-14s %-10s %6s  %s\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}" "${figures[$i]}"
done
grep -A6 "fitted exponents" "$logs/bench_scaling.log" || true
exit $fail

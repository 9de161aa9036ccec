#!/usr/bin/env bash
# The GPU checks of the project in one script, under 8 minutes on one GPU (docs/gpu.md lists
# the steps and what each checks): the `gpu` tests; kill-and-resume identity on CUDA for an
# FC and a conv net; the training options (fp32, bf16, fp16, channels_last, compile, TF32 on
# and off) against a full-float32 metric pass; the pinned-memory streaming path; Table I's
# CIFAR-100 net and MNIST net for a few epochs (epoch time, metric time, peak memory,
# host-device syncs, the cost of train.deterministic); the three benchmarks. Every step has
# its own time limit, and the whole run a budget (DEVICE_CHECK_BUDGET_S, 470 s): a step that
# would start past it is skipped and counts as a failure. Ends with one summary table; exit
# status 1 when a step failed or was skipped. On a machine without CUDA it says so and exits 0.
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

BUDGET=${DEVICE_CHECK_BUDGET_S:-470}
export WANDB_MODE=offline OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
logs=$(mktemp -d)
declare -a names statuses seconds limits figures
fail=0
start=$SECONDS

step() {  # step NAME LIMIT_SECONDS FIGURE_REGEX COMMAND...
    local name=$1 limit=$2 regex=$3
    shift 3
    local left=$((BUDGET - (SECONDS - start))) t0=$SECONDS rc=0
    names+=("$name")
    limits+=("$limit")
    if [ "$left" -lt 20 ]; then
        statuses+=("SKIP (budget)"); seconds+=(0); figures+=(""); fail=1
        echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" >"$logs/$name.log" 2>&1 || rc=$?
    tail -n 25 "$logs/$name.log"
    seconds+=($((SECONDS - t0)))
    if [ "$rc" -eq 0 ]; then statuses+=("ok");
    elif [ "$rc" -eq 124 ]; then statuses+=("TIMEOUT"); fail=1;
    else statuses+=("FAIL rc=$rc"); fail=1; fi
    figures+=("$(grep -E "$regex" "$logs/$name.log" | tail -n 1 | cut -c1-150)")
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -m gpu)
step gpu-tests 120 "passed|failed" "${PYTEST[@]}" -k "not sigkill and not streamed"
step resume-identity 200 "passed|failed" "${PYTEST[@]}" -k sigkill tests/test_device.py
step options 150 "^OPTIONS" "$PY" benchmarks/device_options.py
step stream-pinned 60 "passed|failed" "${PYTEST[@]}" -k streamed tests/test_device.py
step cifar100-recipe 150 "^SUMMARY" "$PY" benchmarks/device_train.py --recipe cifar100 \
    --epochs 2 --compare-deterministic
step mnist-recipe 60 "^SUMMARY" "$PY" benchmarks/device_train.py --recipe mnist --epochs 2
step bench_train 90 "metrics / baseline" "$PY" benchmarks/bench_train.py --scale 0.5 --rounds 2
step bench_metrics 90 "^\(c\)" "$PY" benchmarks/bench_metrics.py --scale 0.25 --repeat 2
step bench_scaling 90 "^ +(n|d|layers|k) +-?[0-9.]+ +-?[0-9.]+ " \
    "$PY" benchmarks/bench_scaling.py --repeat 1 --png "$logs/bench_scaling.png"

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
echo "device_check summary: $((SECONDS - start))s of a ${BUDGET}s budget (logs in $logs)"
printf '%-16s %-13s %5s %5s  %s\n' step status sec limit "key figure"
for i in "${!names[@]}"; do
    printf '%-16s %-13s %5s %5s  %s\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}" \
        "${limits[$i]}" "${figures[$i]}"
done
grep -A6 "fitted exponents" "$logs/bench_scaling.log" 2>/dev/null || true
exit $fail

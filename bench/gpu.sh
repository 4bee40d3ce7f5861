#!/usr/bin/env bash
# The GPU table (BENCHMARKS.md, "The GPU path"): every workload of `python -m bench` on one CUDA device, fp32 and
# bf16, on two model shapes: the default's (its real weights where they are here, else random-135m) and random-1b.
# Quick settings (1 repeat, 2 steps per run: one warm-up, one timed) so the whole table fits in ~8 minutes on an
# H200; every side runs with this machine's python (--python-from-env: a GPU machine without a package index
# cannot build the TRL venvs), so a baseline whose TRL is not installed here is skipped with its reason.
#
#   bash bench/gpu.sh OUT_DIR [more `python -m bench` flags]
#
# Writes OUT_DIR/<model>/{results.md,results.json,raw.jsonl,work/} per shape and OUT_DIR/results.md (both tables).
# PYTHON (default python3) is the interpreter; WORKLOADS_135M / WORKLOADS_1B override each shape's workloads.
# rollout8 is left out by default (rollout16 times the same decoder at the larger batch), and the 1B shape skips
# dpo_lora and reward, whose steps are dpo's forward and backward again: both to keep inside the ~8 minutes.
set -uo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR [python -m bench flags]}
shift
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$out"
status=0
# "" = no --model: the default where its weights are here, random-135m where they are not (bench says which)
for model in "" random-1b; do
  if [ "$model" = random-1b ]; then workloads=${WORKLOADS_1B:-dpo,ppo,grpo,rollout16}; name=random-1b
  else workloads=${WORKLOADS_135M:-dpo,dpo_lora,reward,ppo,grpo,rollout16}; name=135m; fi
  start=$(date +%s)
  "$py" -m bench --device cuda --python-from-env ${model:+--model "$model"} --quick --precisions fp32,bf16 \
    --workloads "$workloads" --max-wait 0 --out "$out/$name" "$@" || status=1
  echo "[gpu.sh] $name: $(( $(date +%s) - start )) s" >&2
done
cat "$out"/135m/results.md "$out"/random-1b/results.md > "$out/results.md" 2>/dev/null || status=1
exit $status

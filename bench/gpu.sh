#!/usr/bin/env bash
# The GPU table (BENCHMARKS.md, "The GPU path"): the workloads of `python -m bench` on one CUDA device, on two model
# shapes: the default's (its real weights where they are here, else random-135m) in fp32 and bf16, and random-1b in
# bf16. Every side runs with this machine's python (--python-from-env: a GPU machine without a package index cannot
# build the TRL venvs); a baseline whose TRL is not importable is skipped with its reason.
#
#   bash bench/gpu.sh OUT_DIR [more `python -m bench` flags]
#
# Four stages, in this order, each one `python -m bench` writing OUT_DIR/<stage>/{results.md,results.json,raw.jsonl,
# work/} and its exit status to OUT_DIR/<stage>/rc: 135m-ppo, 135m (the other workloads), 1b-ppo, 1b; after each
# shape's stages, `bench.rollout_levers` (LEVERS below). PPO is a stage of its own because its baseline is TRL 1.12
# (the last release with PPO) while the others' is TRL 1.16. A stage whose rc is 0 is skipped, so the command can be
# run again to finish what a deadline cut or to re-race a stage that failed.
#
# Environment:
#   PYTHON        interpreter (python3)
#   WHEELS        a folder written here by `.venv/bin/python -m bench.envs --gpu-wheels DIR` (the project venv's
#                 transformers/peft/accelerate and the rest of prefalign's missing dependencies in common/, TRL
#                 1.16 and 1.12 in trl116/ and trl112/): installed under /tmp and put on PYTHONPATH, each stage
#                 with its TRL. Unset: the packages installed there are used as they are.
#   DEADLINE      whole seconds from the start (the wheels' install counts): a stage or lever run starts only with
#                 45 s left and is stopped at the deadline, killed 5 s later if it has not ended (unset: none)
#   STEPS         steps per run (3: one warm-up, two timed; PPO's two warm-up iterations leave one)
#   LEVERS        0: skip `bench.rollout_levers` after each shape's stages (OUT_DIR/levers-<shape>.txt: the decode
#                 loop with and without keyed sampling beside `model.generate`, batch 16, 3 rounds; LEVER_VARIANTS)
#   WORKLOADS_135M, WORKLOADS_1B, PRECISIONS_135M, PRECISIONS_1B   change each shape's lists
set -uo pipefail
out=$(realpath -m "${1:?usage: bash bench/gpu.sh OUT_DIR [python -m bench flags]}")
shift
py=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then WHEELS=$(realpath -m "$WHEELS"); fi  # both given from where the command runs
if [ -n "${DEADLINE:-}" ] && ! [[ $DEADLINE =~ ^[1-9][0-9]*$ ]]; then
  echo "bench/gpu.sh: DEADLINE=$DEADLINE: give whole seconds, e.g. DEADLINE=550" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$out"
t0=$(date +%s)
status=0

site() {  # the PYTHONPATH of a stage whose baseline is TRL $1 (116 or 112)
  if [ -n "${WHEELS:-}" ]; then echo "/tmp/prefalign-wheels/trl$1:/tmp/prefalign-wheels/common${PYTHONPATH:+:$PYTHONPATH}"
  else echo "${PYTHONPATH:-}"; fi
}
if [ -n "${WHEELS:-}" ]; then
  rm -rf /tmp/prefalign-wheels  # no package left from another WHEELS
  for d in common trl116 trl112; do
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "/tmp/prefalign-wheels/$d" "$WHEELS/$d"/*.whl || { echo "[gpu.sh] installing $WHEELS/$d failed" >&2; exit 1; }
  done
fi

within_deadline() {  # within_deadline NAME: sets `limit`, the timeout prefix of a run started now; 1 (said) if <45 s
  limit=()
  [ -n "${DEADLINE:-}" ] || return 0
  local left=$((DEADLINE - ($(date +%s) - t0)))
  if [ "$left" -lt 45 ]; then echo "[gpu.sh] $1: not started, $left s left" >&2; status=1; return 1; fi
  limit=(timeout -k 5 "$left")
}

stage() {  # stage NAME TRL MODEL PRECISIONS WORKLOADS [flags]
  local name=$1 trl=$2 model=$3 precisions=$4 workloads=$5
  shift 5
  # done: its `python -m bench` exited 0 (a stage with a failed run or check is raced again)
  if [ "$(cat "$out/$name/rc" 2>/dev/null)" = 0 ]; then echo "[gpu.sh] $name: done in an earlier run" >&2; return; fi
  within_deadline "$name" || return
  local start=$(date +%s)
  PYTHONPATH=$(site "$trl") "${limit[@]}" "$py" -m bench --device cuda --python-from-env ${model:+--model "$model"} \
    --quick --steps "${STEPS:-3}" --precisions "$precisions" --workloads "$workloads" --max-wait 0 \
    --out "$out/$name" "$@"
  local rc=$?
  mkdir -p "$out/$name" && echo $rc > "$out/$name/rc"
  [ $rc = 0 ] || status=1
  echo "[gpu.sh] $name: exit status $rc, $(($(date +%s) - start)) s" >&2
}

levers() {  # levers SHAPE: bench.rollout_levers on the model the stages raced (what the decode loop costs on a GPU)
  local shape=$1 model=""
  [ "${LEVERS:-1}" = 0 ] && return 0
  [ -f "$out/levers-$shape.txt" ] && return 0
  # the model the shape's last stage raced, from its results.json (a race of the default names none)
  local results=$out/$shape/results.json
  if [ ! -f "$results" ]; then echo "[gpu.sh] levers-$shape: not started, $shape's stage has no results" >&2; status=1; return; fi
  if grep -q '"model": "random-' "$results"; then model=.bench/data-random-$shape/model; fi
  within_deadline "levers-$shape" || return
  PYTHONPATH=$(site 116) "${limit[@]}" "$py" -m bench.rollout_levers --device cuda ${model:+--model "$model"} \
    --batch 16 --rounds 3 --variants "$LEVER_VARIANTS" > "$out/levers-$shape.tmp" && \
    mv "$out/levers-$shape.tmp" "$out/levers-$shape.txt" || status=1
}
# the loop with and without keyed sampling beside model.generate, and keyed sampling over model.generate
# (--decoder generate: the choice a GPU default would make if the loop loses there); on CUDA the loop has no packed
# linears (loopnopack)
LEVER_VARIANTS=${LEVER_VARIANTS:-hf-fp32,hf-bf16-weights,prefalign-generate-fp32,prefalign-loopnopack-fp32,\
prefalign-loopunkeyed-fp32,prefalign-generate-bf16,prefalign-loopnopack-bf16,prefalign-loopunkeyed-bf16}

# "" = no --model: the default where its weights are here, random-135m where they are not (bench says which).
# rollout8 is left out (rollout16 times the same decoder at the larger batch); the 1B shape skips dpo_lora and reward,
# whose steps are dpo's forward and backward again.
p135=${PRECISIONS_135M:-fp32,bf16}
p1b=${PRECISIONS_1B:-bf16}
w135=${WORKLOADS_135M:-rollout16,dpo,grpo,reward,dpo_lora}
w1b=${WORKLOADS_1B:-rollout16,dpo,grpo}
stage 135m-ppo 112 "" "$p135" ppo "$@"
stage 135m 116 "" "$p135" "$w135" "$@"
levers 135m
stage 1b-ppo 112 random-1b "$p1b" ppo "$@"
stage 1b 116 random-1b "$p1b" "$w1b" "$@"
levers 1b
cat "$out"/{135m-ppo,135m,1b-ppo,1b}/results.md > "$out/results.md" 2>/dev/null || status=1
exit $status

#!/usr/bin/env bash
# Pre-trains the shipped backbone on a lent GPU: two tokenizers side by side (context-widened k-means codes,
# the default, and plain patch codes, the first rough recipe's), equal budget, then packs both runs into $OUT.
# Evaluation runs afterwards on any machine: python experiments/evaluate_backbone.py --backbone <run dir>.
#   BUDGET=330 OUT=/tmp/out FASHION_MNIST_DIR=... bash scripts/device_pretrain.sh
set -euo pipefail
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/device_out}; BUDGET=${BUDGET:-330}; WORKERS=${WORKERS:-7}; SHARE=${SHARE:-1.6}
BATCH=${BATCH:-1024}; MAXEPOCHS=${MAXEPOCHS:-400}; EXTRA=(${EXTRA:-})  # EXTRA: more arguments for every run (tests)
PY=${PY:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt" 2>/dev/null || echo cpu > "$OUT/device.txt"
common=(--per_device_train_batch_size "$BATCH" --learning_rate 1.5e-3 --weight_decay 0.05 --adam_beta2 0.98
        --lr_scheduler_type cosine --warmup_steps 0.03 --dataloader_num_workers "$WORKERS" --report_to none
        --logging_steps 50 --save_strategy no --disable_tqdm true --seed 0 --vocab_size 512)
[ -n "${CUDA_OK:-1}" ] && nvidia-smi >/dev/null 2>&1 && common+=(--bf16 --tf32 true)

# 1. throughput probe: 60 steps, wall time without the start-up
t0=$(date +%s.%N)
$PY examples/pretrain_mim.py --output_dir /tmp/vptm_probe --max_steps 60 "${common[@]}" --kmeans_iters 2 \
    --tokenizer_samples 50000 --dataloader_persistent_workers true > "$OUT/probe.log" 2>&1 || { tail -30 "$OUT/probe.log"; exit 1; }
secs=$($PY -c "import json;print(json.load(open('/tmp/vptm_probe/pretrain_summary.json'))['train_seconds'])")
steps_per_epoch=$(( (60000 + BATCH - 1) / BATCH ))
epochs=$($PY -c "print(max(1, min($MAXEPOCHS, int($BUDGET / ($secs / 60) / $SHARE / $steps_per_epoch))))")
echo "probe: 60 steps in ${secs}s -> $epochs epochs each for a ${BUDGET}s budget" | tee "$OUT/plan.txt"

# 2. two runs in parallel, same recipe, different tokens
run() {  # name, context
  $PY examples/pretrain_mim.py --output_dir "/tmp/vptm_runs/$1" --num_train_epochs "$epochs" "${common[@]}" "${EXTRA[@]}" \
      --token_context "$2" --dataloader_persistent_workers true > "$OUT/$1.log" 2>&1
}
run ctx2 2 & a=$!
run ctx0 0 & b=$!
ra=0; rb=0; wait $a || ra=$?; wait $b || rb=$?
echo "exit codes: ctx2=$ra ctx0=$rb" | tee -a "$OUT/plan.txt"
for name in ctx2 ctx0; do
  tar -C /tmp/vptm_runs -czf "$OUT/$name.tar.gz" --exclude='checkpoint-*' "$name" || true
  tail -3 "$OUT/$name.log"
done

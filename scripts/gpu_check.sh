#!/usr/bin/env bash
# The project's GPU figures in one call: the gpu-marked tests (CUDA against CPU, bf16 training, mixed-task
# serving, torch.compile against eager), experiments/benchmark.py --compile on the BEiT-base layout (batch 128) and on
# the tiny one, and experiments/benchmark_training.py (run_classification.py's Trainer against the model's own step).
# Meant to finish in under 8 minutes on one H200; each step has its own time limit, so one slow step cannot take the
# others' reports with it.
#
# The machine needs torch, transformers, huggingface_hub and accelerate (and pyarrow, pandas, xxhash and fsspec, which
# datasets reads). datasets and evaluate (and dill and multiprocess, which they need beyond those) come as wheels, made
# once where PyPI is reachable, in two sets tried in turn: $WHEELS the versions the suite runs on here (datasets 5.2
# needs pyarrow >= 24 and huggingface_hub >= 1.31), then $WHEELS/floor the project's declared floor, which .ci/floors
# tests (datasets 4.0: pyarrow >= 15). A set is kept when datasets writes and reads a parquet file with it.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d wheels datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 \
#       peft==0.21.2
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d wheels/floor datasets==4.0.0 evaluate==0.4.6 dill==0.3.8 multiprocess==0.70.16 \
#       peft==0.20.0
# (peft, for LoRA's row of the training-path benchmark, which leaves it out where peft does not import)
#
#   WHEELS=wheels OUT=/tmp/gpu-check bash scripts/gpu_check.sh
#   QUICK=1 OUT=/tmp/gpu-check-quick bash scripts/gpu_check.sh     # small everything: checks the script, on a CPU too
#
# Writes to $OUT: summary.md (device, versions, each step's status and time, the test summary, every table),
# benchmark-base.json, benchmark-tiny.json, benchmark_training.json, gpu_tests.log, and reports.tar.gz with
# everything the steps wrote (logs, tables, plots).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}; WHEELS=${WHEELS:-wheels}; QUICK=${QUICK:-0}; PY=${PY:-python3}
WORK=$(mktemp -d /tmp/gpu-check-work.XXXX)
mkdir -p "$OUT" "$WORK/logs"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME=$WORK/hf

# 1. datasets and evaluate: the machine's own, else the first set of wheels that works there (see the header)
works() {  # [site folder]: datasets and evaluate import, and datasets writes and reads a parquet file
  PYTHONPATH=$PYTHONPATH${1:+:$1} $PY - > "$WORK/logs/datasets.log" 2>&1 <<'PY'
import os, tempfile
import datasets, evaluate
path = os.path.join(tempfile.mkdtemp(), "check.parquet")
datasets.Dataset.from_dict({"x": [1, 2]}).to_parquet(path)
assert datasets.load_dataset("parquet", data_files=path)["train"]["x"] == [1, 2]
print(f"datasets {datasets.__version__}, evaluate {evaluate.__version__}")
PY
}
if ! works; then
  SITE=
  for set in "$WHEELS" "$WHEELS/floor"; do
    ls "$set"/*.whl >/dev/null 2>&1 || continue
    rm -rf "$WORK/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$set"/*.whl \
      > "$WORK/logs/pip.log" 2>&1 || { echo "the wheels in $set do not install:"; tail -3 "$WORK/logs/pip.log"; continue; }
    works "$WORK/site" && { SITE=$WORK/site; echo "from the wheels in $set: $(tail -1 "$WORK/logs/datasets.log")"; break; }
    echo "the wheels in $set do not work here:"; tail -3 "$WORK/logs/datasets.log"
  done
  [ -n "$SITE" ] || {
    $PY -c "import pyarrow, huggingface_hub as h; print('pyarrow', pyarrow.__version__, 'huggingface_hub', h.__version__)"
    echo "no datasets/evaluate that works here: the machine has none and no set of wheels in WHEELS=$WHEELS works"
    echo "(see the header for the two sets)"; exit 2; }
  export PYTHONPATH=$PYTHONPATH:$SITE
fi
{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"; echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /' || echo "GPU: none"
  $PY -c "import sys, torch, transformers, datasets, accelerate, huggingface_hub as h
print(f'python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, '
      f'datasets {datasets.__version__}, accelerate {accelerate.__version__}, huggingface_hub {h.__version__}')"
  echo; echo "| step | status | seconds |"; echo "|---|---|---|"
} > "$WORK/summary.md"

step() {  # name, time limit in seconds, command...: runs one step, logs it, records its status and time
  local name=$1 limit=$2; shift 2
  local start=$SECONDS status
  timeout --kill-after=10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  status=$?
  [ $status -eq 0 ] && status=ok || { [ $status -eq 124 ] && status="timed out (${limit} s)" || status="failed ($status)"; }
  echo "| $name | $status | $((SECONDS - start)) |" >> "$WORK/summary.md"
  echo "$name: $status in $((SECONDS - start)) s"; tail -3 "$WORK/logs/$name.log"
}

# `-o addopts=`: the project's default options run the files in parallel through pytest-xdist, which such a machine
# need not have; the CUDA tests are one file, run in one process
if [ "$QUICK" = 1 ]; then
  step gpu_tests 300 $PY -m pytest -o addopts= -q -m gpu tests/test_cuda.py -x
  step benchmark_base 300 $PY experiments/benchmark.py --quick --arch base --output_dir "$WORK/benchmark-base"
  step benchmark_tiny 300 $PY experiments/benchmark.py --quick --arch tiny --output_dir "$WORK/benchmark-tiny"
  step benchmark_training 300 $PY experiments/benchmark_training.py --quick --output_dir "$WORK/benchmark_training"
else
  # the headline figure first: the training path against the model
  step benchmark_training 150 $PY experiments/benchmark_training.py --output_dir "$WORK/benchmark_training"
  step benchmark_base 120 $PY experiments/benchmark.py --arch base --batch 128 --compile --output_dir "$WORK/benchmark-base"
  step gpu_tests 150 $PY -m pytest -o addopts= -q -m gpu tests/test_cuda.py
  step benchmark_tiny 60 $PY experiments/benchmark.py --arch tiny --batch 128 --compile --output_dir "$WORK/benchmark-tiny"
fi

{
  echo; echo "## gpu-marked tests"; echo; grep -E "passed|failed|error|skipped" "$WORK/logs/gpu_tests.log" | tail -3
  for name in benchmark-base benchmark-tiny; do
    [ -f "$WORK/$name/benchmark.md" ] && { echo; echo "## $name (experiments/benchmark.py)"; echo; cat "$WORK/$name/benchmark.md"; }
  done
  [ -f "$WORK/benchmark_training/benchmark_training.md" ] && {
    echo; echo "## benchmark_training (experiments/benchmark_training.py)"; echo
    cat "$WORK/benchmark_training/benchmark_training.md"; }
} >> "$WORK/summary.md"
cp "$WORK/summary.md" "$OUT/summary.md"
cp "$WORK/logs/gpu_tests.log" "$OUT/gpu_tests.log" 2>/dev/null
for name in benchmark-base benchmark-tiny; do cp "$WORK/$name/benchmark.json" "$OUT/$name.json" 2>/dev/null; done
cp "$WORK/benchmark_training/benchmark_training.json" "$OUT/" 2>/dev/null
# everything else the steps wrote, without the image folder, caches, backbones and checkpoints they made
tar -C "$WORK" -czf "$OUT/reports.tar.gz" --exclude=hf --exclude=site --exclude=images --exclude=cache \
    --exclude=backbone --exclude=runs summary.md logs $(cd "$WORK" && ls -d benchmark* 2>/dev/null)
cat "$OUT/summary.md"
rm -rf "$WORK"

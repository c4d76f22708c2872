#!/bin/sh
# nano-tiny through `nanokit eval` on a CPU, on the first 200 evaluation problems at budgets 0, 16,
# 64 and none: fp32 torch, the INT4 AWQ ONNX bundle, and a pruned nano-tiny (14 -> 12 layers,
# hidden 256 -> 224) before and after distillation from nano-tiny. One thread per process, niced
# (a shared 2-core machine). Intermediate files go to $WORK (default /tmp/nano-tiny-cpu); the
# results to experiments/nano_tiny/results/harness-*-cpu/. Run from the repository root:
#
#     sh experiments/nano_tiny/harness_cpu.sh [step ...]
#
# steps: text export prune distill eval (= eval-fp32 eval-int4 eval-pruned eval-distilled); all by default.
# nanokit and python are the project's (PATH=.venv/bin:$PATH).
set -eu
WORK=${WORK:-/tmp/nano-tiny-cpu}
RESULTS=experiments/nano_tiny/results
EVAL="--tasks nanokit_arithmetic --budgets 0,16,64,none --limit 200 --device cpu"
export OMP_NUM_THREADS=1
run() { echo "+ $*"; nice -n 10 "$@"; }
steps=${*:-text export prune distill eval}
mkdir -p "$WORK/data"

for step in $steps; do case $step in
text)  # calibration and distillation text, none of it an evaluation problem
  # INT4 calibration as bench/onnx_int4_quality.py makes it: 64 of nano-tiny's own worked answers
  run python experiments/nano_tiny/task_text.py worked --problems 64 --seed 20261123 --out "$WORK/data/calib-worked-seed20261123.jsonl"
  # pruning calibration and distillation: train.py's training mix, fresh problems
  run python experiments/nano_tiny/task_text.py train --problems 4000 --seed 2 --out "$WORK/data/train-seed2.jsonl"
  run python experiments/nano_tiny/task_text.py train --problems 10000 --seed 3 --out "$WORK/data/distill-train-seed3.jsonl" ;;
export)
  run nanokit export onnx --model nano-tiny --dtype fp32 --quant int4_awq --calib "$WORK/data/calib-worked-seed20261123.jsonl" \
      --calib-samples 64 --calib-len 256 --out "$WORK/int4" --force ;;
prune)
  run nanokit prune --teacher nano-tiny --layers 12 --hidden 224 --calib "$WORK/data/train-seed2.jsonl" --samples 64 \
      --length 512 --device cpu --out "$WORK/pruned" --overwrite ;;
distill)  # 256 steps of 8 x 1024 tokens (2.1M tokens, no sample twice)
  run nanokit distill --teacher nano-tiny --student "$WORK/pruned" --data "$WORK/data/distill-train-seed3.jsonl" \
      --tokens 2097152 --seq-len 1024 --batch-size 8 --micro-batch 8 --lr 1e-3 --min-lr 1e-4 --warmup 10 \
      --eval-every 32 --eval-samples 16 --save-every 64 --no-activation-checkpointing --device cpu \
      --out "$WORK/distilled" --overwrite ;;
eval) sh "$0" eval-fp32 eval-int4 eval-pruned eval-distilled ;;
eval-fp32) run nanokit eval --model nano-tiny $EVAL --out $RESULTS/harness-fp32-cpu --overwrite ;;
eval-int4) run nanokit eval --model nano-tiny --onnx "$WORK/int4" $EVAL --out $RESULTS/harness-int4-onnx-cpu --overwrite ;;
eval-pruned) run nanokit eval --model "$WORK/pruned" $EVAL --out $RESULTS/harness-pruned-cpu --overwrite ;;
eval-distilled) run nanokit eval --model "$WORK/distilled" $EVAL --out $RESULTS/harness-pruned-distilled-cpu --overwrite ;;
*) echo "unknown step $step (text export prune distill eval eval-fp32 eval-int4 eval-pruned eval-distilled)" >&2; exit 2 ;;
esac; done

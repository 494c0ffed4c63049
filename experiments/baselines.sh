#!/usr/bin/env bash
# The baselines experiment (docs/results.md): train the four baselines with the bundled model's
# budget, evaluate all five models with the same settings, write the table and the figure.
#
#   bash experiments/baselines.sh train     # four runs, one thread each (run two at a time on 2 cores)
#   bash experiments/baselines.sh evaluate  # runs/*/evaluation/{test,retrieval}.json
#   bash experiments/baselines.sh report    # docs/results.md + docs/results_samples.png
#
# Budget: 5,150 steps of 100 scenes (51 epochs), as the bundled alignDRAW model
# (src/aligndraw/pretrained/mnist-captions/README.md; its run directory is runs/bundled).
set -euo pipefail
export OMP_NUM_THREADS=1
STEPS=5150
MODELS=(noalign sentvec fcvae convvae)
AL="${ALIGNDRAW:-aligndraw}"

train() {
  for m in "${MODELS[@]}"; do
    $AL train --preset mnist-captions --model "$m" --out "runs/$m" --num-threads 1 \
      --checkpoint-every 200 --max-steps $STEPS --no-progress
  done
}

evaluate_one() {
  local run=$1
  $AL evaluate --model "$run" --split test --metrics nll,iwae,fidelity,ssim --iwae-k 10 \
    --max-captions 1000 --ssim-samples 20 --fidelity-samples 4 --threads 1 \
    --out "$run/evaluation/test.json"
  $AL evaluate --model "$run" --split test --metrics retrieval --max-captions 200 \
    --retrieval-samples 2 --threads 1 --out "$run/evaluation/retrieval.json"
}

evaluate() {
  for run in runs/bundled "${MODELS[@]/#/runs/}"; do evaluate_one "$run"; done
}

report() {
  $AL report runs/bundled "${MODELS[@]/#/runs/}" --out docs/results.md \
    --title "alignDRAW and its baselines on captioned MNIST" --notes docs/results_notes.md
  mkdir -p docs/results
  for run in runs/bundled "${MODELS[@]/#/runs/}"; do
    name=$(basename "$run")
    cp "$run/evaluation/test.json" "docs/results/${name}_test.json"
    cp "$run/evaluation/retrieval.json" "docs/results/${name}_retrieval.json"
  done
}

case "${1:-}" in
  train) train ;;
  evaluate) if [ -n "${2:-}" ]; then evaluate_one "$2"; else evaluate; fi ;;
  report) report ;;
  *) echo "usage: bash experiments/baselines.sh train|evaluate [RUN_DIR]|report" >&2; exit 2 ;;
esac

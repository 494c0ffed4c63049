#!/usr/bin/env bash
# How the bundled model (src/aligndraw/pretrained/mnist-captions) was trained, evaluated and
# installed. Every phase resumes the run directory exactly (weights, optimiser, data order,
# noise streams); only the flags below change between phases.
#
#   bash experiments/bundled.sh phase1     # steps 0–5,000: the paper's recipe (lr 1e-3, ÷10 on
#                                          # a 2-epoch plateau: it fell to 1e-4 at epoch 36)
#   bash experiments/bundled.sh phase2     # warm restart at 3e-4, patience 3, fp32, to 6,200
#   bash experiments/bundled.sh phase3     # the same schedule with bf16 autocast + torch.compile,
#                                          # to 11,700 (the plateau rule cut lr to 3e-5 at epoch 105)
#   bash experiments/bundled.sh phase4     # warm restart at 1e-4 (10 epochs without decay, then
#                                          # patience 3: 1e-5 after epoch 136) to epoch 150
#   bash experiments/bundled.sh evaluate   # RUN/evaluation/{test,test_t05,retrieval}.json
#   bash experiments/bundled.sh install    # RUN/best → the package (model card written by hand)
#
# As run: phase 1 on one thread to step 2,000 and two threads after; phase 2 on one thread;
# phase 3 on one thread to step 9,600 and two threads after, stopped at step 11,700 when the
# session's time ran short (best validation: step 11,600); phase 4 from a copy of the run at its
# step-11,600 checkpoint, on two threads to step 13,180, then (resumed from step 13,000) on one
# thread to the preset's 150 epochs (step 15,000, the best validation bound). Thread counts
# change float rounding, not the recipe.
set -euo pipefail
RUN="${RUN:-runs/bundled_long}"
AL="${ALIGNDRAW:-aligndraw}"
THREADS="${THREADS:-2}"
export OMP_NUM_THREADS=$THREADS
COMMON=(--preset mnist-captions --out "$RUN" --num-threads "$THREADS" --checkpoint-every 200
        --no-progress)

case "${1:-}" in
  phase1) $AL train "${COMMON[@]}" --max-steps 5000 ;;
  phase2) $AL train "${COMMON[@]}" --resume --restart-lr --lr 3e-4 --lr-patience 3 --max-steps 6200 ;;
  phase3) $AL train "${COMMON[@]}" --resume --lr 3e-4 --lr-patience 3 --precision bf16 --compile \
            --max-steps 11700 ;;
  phase4) $AL train "${COMMON[@]}" --resume --restart-lr --lr 1e-4 --lr-patience 3 --precision bf16 \
            --compile ;;
  evaluate)
    $AL evaluate --model "$RUN" --split test --metrics nll,iwae,fidelity,ssim --iwae-k 10 \
      --max-captions 1000 --ssim-samples 20 --fidelity-samples 4 --threads 1 \
      --out "$RUN/evaluation/test.json" &
    $AL evaluate --model "$RUN" --split test --metrics retrieval --max-captions 200 \
      --retrieval-samples 2 --threads 1 --out "$RUN/evaluation/retrieval.json" &
    wait
    $AL evaluate --model "$RUN" --split test --metrics fidelity,ssim --temperature 0.5 \
      --max-captions 1000 --ssim-samples 20 --fidelity-samples 4 --threads 1 \
      --out "$RUN/evaluation/test_t05.json" ;;
  install)
    dest=src/aligndraw/pretrained/mnist-captions
    cp "$RUN/best/config.json" "$RUN/best/model.safetensors" "$RUN/best/vocab.json" "$dest/"
    mkdir -p docs/evaluation
    for f in test test_t05 retrieval; do
      cp "$RUN/evaluation/$f.json" "docs/evaluation/bundled_$f.json"
      cp "$RUN/evaluation/$f.md" "docs/evaluation/bundled_$f.md"
    done ;;
  *) echo "usage: [RUN=runs/NAME] bash experiments/bundled.sh phase1|phase2|phase3|phase4|evaluate|install" >&2
     exit 2 ;;
esac

#!/usr/bin/env bash
# The demo model's GLO recipe (issue 16; models/demo-brain-mri/README.md, "G fitted by generative
# latent optimisation"), every step resumable: run it again after any interruption and it goes on
# from the last state it wrote.  From the repository root, after scripts/demo_gpu_prepare.sh (the
# templates in .demo-templates):
#   1. data: the 58 training volumes (34 copies of the two training templates, 24 more with brains
#      0.85-1.15x their size), the held-out template's 17 and 33, prepared at 128^3, 1.6 mm;
#   2. G fitted by GLO: every training volume a latent of its own, learnt with G by whole-volume L1
#      (benchmarks/probe_g_fit.py), GLO_ITERS (5000) iterations;
#   3. the same fit resumed with Gaussian noise of sd NOISE (0.6) on the codes on their way into G, to
#      NOISE_ITERS (7000) in all: G learns each code's neighbourhood, so samples between them are brains;
#   4. a model directory of it (scripts/glo_to_model.py: the codes' Gaussian folded into G^A; D and the
#      encoders from models/demo-brain-mri);
#   5. E^H and E^G trained through the frozen G (voxgen train --init-from ... --freeze-g on), ENC_ITERS
#      (1500) iterations, a checkpoint every 100;
#   6. WORK/final: the encoder run's model plus the two latent directions (voxgen fit-direction);
#   7. with EVAL=1, the card's figures into OUT (eval_demo.py at n = 8 and n = 16 with the shipped model
#      beside it, eval_encoder.py at 0 and 20 fit steps, eval_traverse.py, render_demo.py PNGs).
# Settings (environment): DEVICE (cpu | cuda; default cpu), WORK (/tmp/demo-glo), DATA (WORK/data),
# OUT (WORK/out), BUDGET (seconds; a step still running then is stopped at its last save and the script
# exits 3: run it again to go on), UNTIL (stop after this step: data, glo, noise, model, enc, final).
# On the 2-core AMD EPYC with AVX2 only, step 2 runs at 1.7 s/iteration; on a 2-core Intel Xeon with
# AMX at 0.6 (benchmarks/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cpu}
WORK=${WORK:-/tmp/demo-glo}
DATA=${DATA:-$WORK/data}
OUT=${OUT:-$WORK/out}
GLO_ITERS=${GLO_ITERS:-5000}
NOISE_ITERS=${NOISE_ITERS:-7000}
NOISE=${NOISE:-0.6}
ENC_ITERS=${ENC_ITERS:-1500}
N_DIRECTION=${N_DIRECTION:-128}
EVERY=${EVERY:-250}
BUDGET=${BUDGET:-0}
UNTIL=${UNTIL:-}
EVAL=${EVAL:-0}
PY=${PYTHON:-python3}
T=.demo-templates
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$WORK" "$DATA" "$OUT"
t_end=$(( BUDGET > 0 ? $(date +%s) + BUDGET : 0 ))
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt"; }
# run a long step under what is left of BUDGET; exit 3 (resumable) when it runs out
bounded() {
  if (( t_end == 0 )); then "$@"; return; fi
  local left=$(( t_end - $(date +%s) ))
  if (( left <= 0 )) || ! timeout --signal=INT "$left" "$@"; then
    (( $(date +%s) >= t_end )) || exit 1
    log "BUDGET spent during: $*; run again to resume"; exit 3
  fi
}
done_with() { [ "$UNTIL" = "$1" ] && { log "stopped after $1 (UNTIL)"; exit 0; }; return 0; }
iteration() { [ -f "$1" ] && $PY -c "import sys; from safetensors import safe_open
print(safe_open(sys.argv[1], 'pt').metadata()['iteration'])" "$1" || echo 0; }

log "device $DEVICE; work $WORK; $($PY -c 'import torch; print("torch", torch.__version__)')"
# 1. data
prep() { $PY -m model.cli prepare "$1" -o "$2" --modality mri --resolution 128 --spacing 1.6 > /dev/null 2>&1; }
TRAIN=($T/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz $T/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz)
if [ ! -f "$DATA/demo-ds/manifest.json" ]; then
  rm -rf "$DATA/demo-src"
  $PY scripts/make_demo_data.py "${TRAIN[@]}" -o "$DATA/demo-src" --n 16 --size 160 --include-original > /dev/null
  $PY scripts/make_demo_data.py "${TRAIN[@]}" -o "$DATA/demo-src" --n 12 --size 160 --seed 2 --scale 0.87 1.18 \
      --tag wide > /dev/null
  prep "$DATA/demo-src" "$DATA/demo-ds"
fi
for n in 16 32; do
  d=$DATA/heldout$((n + 1))
  if [ ! -f "$d-ds/manifest.json" ]; then
    rm -rf "$d"
    $PY scripts/make_demo_data.py $T/MNI152_T1_1mm_brain.nii.gz -o "$d" --n $n --size 160 --seed 1 --include-original \
        > /dev/null
    prep "$d" "$d-ds"
  fi
done
log "data: $(ls "$DATA/demo-ds/volumes" | wc -l) training, $(ls "$DATA/heldout17-ds/volumes" | wc -l) and" \
    "$(ls "$DATA/heldout33-ds/volumes" | wc -l) held-out volumes"
done_with data

# 2-3. GLO, then GLO with noise on the codes
amp=off; [ "$DEVICE" = cuda ] && amp=on
fit() {  # $1 state, $2 iterations, rest: extra options
  local state=$1 n=$2; shift 2
  local resume=(); [ -f "$state" ] && resume=(--resume)
  bounded $PY benchmarks/probe_g_fit.py --data "$DATA/demo-ds" --volumes all --batch 2 --learn-codes \
      --sub-volume off --lr 3e-4 --iterations "$n" --every "$EVERY" --device "$DEVICE" --amp $amp \
      --save "$state" "${resume[@]}" "$@" >> "$OUT/fit.log" 2>&1
}
if (( $(iteration "$WORK/glo.safetensors") < GLO_ITERS )); then
  log "GLO to iteration $GLO_ITERS (from $(iteration "$WORK/glo.safetensors"))"
  fit "$WORK/glo.safetensors" "$GLO_ITERS"
fi
log "GLO: $(tail -1 "$OUT/fit.log" 2>/dev/null)"
done_with glo
if [ ! -f "$WORK/glo_noise.safetensors" ]; then cp "$WORK/glo.safetensors" "$WORK/glo_noise.safetensors"; fi
if (( $(iteration "$WORK/glo_noise.safetensors") < NOISE_ITERS )); then
  log "GLO with code noise $NOISE to iteration $NOISE_ITERS (from $(iteration "$WORK/glo_noise.safetensors"))"
  fit "$WORK/glo_noise.safetensors" "$NOISE_ITERS" --code-noise "$NOISE"
fi
done_with noise

# 4. the model directory
if [ ! -f "$WORK/glo_model/model.safetensors" ] || [ "$WORK/glo_noise.safetensors" -nt "$WORK/glo_model/model.safetensors" ]; then
  $PY scripts/glo_to_model.py --state "$WORK/glo_noise.safetensors" --template models/demo-brain-mri \
      -o "$WORK/glo_model" > /dev/null
  log "model directory from the fit at iteration $(iteration "$WORK/glo_noise.safetensors")"
fi
done_with model

# 5. the encoders through the frozen G
resume=(); [ -f "$WORK/enc/latest.json" ] && resume=(--resume)
log "encoders to iteration $ENC_ITERS${resume:+ (resumed)}"
bounded $PY -m model.cli train --family hagan --data "$DATA/demo-ds" -o "$WORK/enc" --iterations "$ENC_ITERS" \
    --batch 2 --device "$DEVICE" --seed 5 --recipe small-data --init-from "$WORK/glo_model" --freeze-g on \
    --augment on --rec-region whole --lr-e 1e-4 --lambda-prior 0 --amp auto --checkpoint-every 100 \
    --keep-checkpoints 0 --monitor-every 0 "${resume[@]}" >> "$OUT/enc.log" 2>&1
done_with enc

# 6. the served model: the encoder run's final weights and the latent directions
if [ ! -f "$WORK/final/directions.safetensors" ]; then
  rm -rf "$WORK/final" && mkdir -p "$WORK/final"
  cp "$WORK/enc/model/config.json" "$WORK/enc/model/model.safetensors" "$WORK/final/"
  for attr in brain_tissue_ml bright_tissue_ml; do
    $PY -m model.cli fit-direction --model "$WORK/final" --attribute $attr --n "$N_DIRECTION" --seed 0 --device "$DEVICE" \
        >> "$OUT/directions.log" 2>&1
  done
  log "final model in $WORK/final"
fi
done_with final
[ "$EVAL" = 1 ] || exit 0

# 7. the card's figures (CPU, as the card measured them)
E=$OUT/eval && mkdir -p "$E"
M=$WORK/final
run_eval() { local name=$1; shift; [ -s "$E/$name.txt" ] || "$@" > "$E/$name.txt" 2>&1; }
run_eval demo_n8 $PY benchmarks/eval_demo.py --real "$DATA/heldout17-ds" --model "$M" --model models/demo-brain-mri \
    --n 8 --encode-steps 0 -o "$E/demo_n8"
run_eval demo_n16 $PY benchmarks/eval_demo.py --real "$DATA/heldout33-ds" --model "$M" --model models/demo-brain-mri \
    --n 16 --encode-steps 0 -o "$E/demo_n16"
for steps in 0 20; do
  run_eval encoder_steps$steps $PY benchmarks/eval_encoder.py --model "$M" --scan $T/MNI152_T1_1mm_brain.nii.gz \
      --data "$DATA/demo-ds" --scales 0.85,0.925,1,1.075,1.15 --steps $steps --png "$E/reconstructions_steps$steps.png"
done
run_eval traverse $PY benchmarks/eval_traverse.py --model "$M" --attribute brain_tissue_ml --n 64 --seeds 8
run_eval render_samples $PY benchmarks/render_demo.py --model "$M" --n 8 --seed 0 -o "$E/samples.png"
run_eval render_real $PY benchmarks/render_demo.py --data "$DATA/heldout17-ds" --n 8 --seed 0 -o "$E/heldout_real.png"
log "figures in $E"

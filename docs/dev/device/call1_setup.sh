#!/bin/bash
# Device call 1: install wheels, unpack the 0.4.0 model, start the background data job, smoke-train on CUDA
# with random LLM weights (same architecture) and measure seconds per iteration at batch 32.
T0=$(date +%s); REPO=$PWD
nvidia-smi -L; nproc; free -g | head -2; df -h /tmp | tail -1
mkdir -p /tmp/stage /tmp/src
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/a/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:/tmp/src PYTHONUNBUFFERED=1 RADFM3D_CACHE=/tmp/rc
if ! python3 -c "import transformers, peft" ; then echo "carried transformers failed: using the image's"; rm -rf /tmp/site/transformers* /tmp/site/regex*; fi
tar -C /tmp/stage -xJf .gpu/a/model04.tar.xz && ls -la /tmp/stage/model
cp -r radfm3d bundles /tmp/src/ && cp .gpu/a/bg_data.sh /tmp/src/
python3 -c "import torch, transformers, peft, monai, ignite, nibabel; print('torch', torch.__version__, torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__, 'monai', monai.__version__, 'ignite', ignite.__version__)" || exit 1
setsid nohup bash /tmp/src/bg_data.sh > /tmp/bg.log 2>&1 < /dev/null &
echo "t=$(( $(date +%s) - T0 )) s: background data job started"
python3 -m radfm3d.cli phantoms --n ${SMOKE_N:-150} --seed 99 --out /tmp/ph_smoke --workers 8 --dicom-fraction 0 --no-progress || exit 1
echo "t=$(( $(date +%s) - T0 )) s: smoke phantoms"
cd /tmp/src/bundles/radfm3d_demo
python3 -m monai.bundle run --config_file configs/train.json --dataset_dir /tmp/ph_smoke \
  --model_name_or_path /tmp/stage/model --network_def#load_text_weights False --train_vision false --train_resampler false \
  --output_dir /tmp/smoke_run --model_dir /tmp/smoke_model --max_epochs 1 --batch_size ${BATCH:-32} --num_workers ${NW:-12} \
  --log_every 5 --show_progress false --save_interval 1000 --warmup_steps 5 2>&1 | tee /tmp/smoke.log | grep -v "^.*INFO - > " | tail -40
ls -la /tmp/smoke_model
python3 - <<'PY'
import re, datetime
t = []
for line in open("/tmp/smoke.log"):
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) .*Iter: (\d+)/(\d+) -- train_loss", line)
    if m:
        t.append((int(m.group(2)), datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()))
if len(t) >= 3:
    (i0, t0), (i1, t1) = t[1], t[-1]
    rate = (t1 - t0) / (i1 - i0)
    open("/tmp/rate.txt", "w").write(f"{rate:.4f}\n")
    print(f"SMOKE RATE {rate:.3f} s/it at batch 32 over iterations {i0}-{i1}")
else:
    print("SMOKE: too few iteration lines", t)
PY
nvidia-smi --query-gpu=memory.used --format=csv
echo "t=$(( $(date +%s) - T0 )) s: smoke done"; tail -3 /tmp/bg.log

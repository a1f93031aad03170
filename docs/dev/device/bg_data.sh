#!/bin/bash
# Background job (setsid, started by call 1): 5,000 fresh phantoms (seed 11), then the preprocessed-image cache.
export PYTHONPATH=/tmp/site:/tmp/src PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m radfm3d.cli phantoms --n ${BG_N:-5000} --seed 11 --out /tmp/ph11 --workers ${NW:-14} --dicom-fraction 0 --prior-fraction 0.15 --no-progress || exit 1
touch /tmp/ph11.gen_done; echo "phantoms done in $(( $(date +%s) - T0 )) s"
python3 - <<'PY'
from radfm3d.engine.training import load_processor
from radfm3d.engine.data import _image_cache, read_records
from radfm3d.data.cache import images_of
proc = load_processor("/tmp/stage/model", "/tmp/ph11/preprocessing.json")
cache = _image_cache(proc, "/tmp/cache11")
print("warmed", cache.warm(images_of(read_records("/tmp/ph11/train.jsonl")), num_workers=int(__import__("os").environ.get("NW", 14)), progress=False))
PY
touch /tmp/ph11.done; echo "cache done in $(( $(date +%s) - T0 )) s"

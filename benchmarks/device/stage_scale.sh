#!/bin/bash
# Stage the payload of the issue-19 GPU benchmark (benchmarks/device/run_scale.sh) for a lent device machine that
# reaches nothing outside. Run here, from the repository root, after `make install`. Writes .gpu/scale (git-ignored
# through .git/info/exclude; ~32 MB): the pure-Python wheels the GPU image lacks or has in other versions (the same
# set docs/dev/device/stage.sh carries) and bitsandbytes unpacked with only its CUDA 13 libraries (the wheel is 43 MB,
# the libraries for the image's CUDA 13 are 8 MB).
set -euo pipefail
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu/scale && mkdir -p .gpu/scale/whl .gpu/scale/bnb
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$@"; }
dl .gpu/scale/whl monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 gguf==0.19.0 fire==0.7.1 termcolor \
  pydicom==3.0.2 pynrrd==1.1.3 transformers==5.24.0 peft==0.21.2 regex==2026.11.19
dl .gpu/scale bitsandbytes==0.50.2
(cd .gpu/scale/bnb && unzip -q ../bitsandbytes-*.whl -x 'bitsandbytes/libbitsandbytes_cuda1[12]*' \
  'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*' && ls bitsandbytes/*.so)
rm .gpu/scale/bitsandbytes-*.whl
du -sh .gpu/scale
# what travels: the tracked tree + .gpu/scale must stay under 64 MiB; the demo model's 36 MB weights do not fit
# beside the wheels and are not needed (the GPU generation benchmark uses the demo preset and the tokenizer only)
echo "then: git rm -q --cached bundles/radfm3d_demo/models/model/model.safetensors &&" \
  "echo /bundles/radfm3d_demo/models/model/model.safetensors >> .git/info/exclude" \
  "(undo after the run: git reset -q bundles/radfm3d_demo/models/model/model.safetensors and drop that exclude line)"

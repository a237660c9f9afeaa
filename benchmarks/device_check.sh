#!/bin/bash
# benchmarks/predict.py on a lent GPU machine (no network there): the small demo model
# (f < m: the model waits for tiles) and a heavy one (f > m: the model must stay busy).
#
# Prepared on the workstation, in the repository root, into .gpu/ (git-ignored through
# .git/info/exclude), then carried with the working tree:
#   .gpu/whl/  cp312 wheels the GPU image lacks: pycurl simplejpeg shapely tomli_w
#              (pip download --no-deps --only-binary=:all: --python-version 3.12 ...)
#   .gpu/bin/nginx  a wrapper that runs .gpu/bin/nginx.real (Debian's nginx binary)
#              with LD_LIBRARY_PATH=.gpu/lib (its libssl, libcrypto, libpcre2, libz, libcrypt)
# The image has python3 with PyTorch + CUDA, torchvision, onnx, onnxruntime (CPU),
# numpy, pyarrow, rich, typer, aiohttp and Pillow. Results go to $OUT (or ./gpu-out).
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
export PATH=$PWD/.gpu/bin:$PATH
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  python3 -c "import sys, torch, pycurl, onnxruntime; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), pycurl.version.split()[0], 'ort', onnxruntime.__version__)"
  nginx -v 2>&1
} | tee "$OUT/machine.txt"
TILES=${TILES:-20000}
COMMON=(--tiles "$TILES" --device cuda --workers 8 --concurrency 512 --cache /tmp/bench-cache --timeout 240)
python3 benchmarks/predict.py "${COMMON[@]}" --model benchmarks.gpu_models:demo --threads 12 --batch 256 2>&1 | tee "$OUT/demo.txt"
python3 benchmarks/predict.py "${COMMON[@]}" --model benchmarks.gpu_models:heavy --threads 8 --batch 128 2>&1 | tee "$OUT/heavy.txt"

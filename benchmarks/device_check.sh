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
# 60,000 tiles: about 90 s to render on 16 cores, then about 100 s for the three runs.
TILES=${TILES:-60000}
COMMON=(--tiles "$TILES" --device cuda --workers 8 --concurrency 512 --cache /tmp/bench-cache --timeout 240 --threads 6)
# e streamed by 6 fetch processes; then a short run streamed by one fetch thread (the
# default) for comparison; then the heavy model, 4 fetch processes
python3 benchmarks/predict.py "${COMMON[@]}" --model benchmarks.gpu_models:demo --batch 256 --run-workers 6 2>&1 | tee "$OUT/demo.txt"
python3 benchmarks/predict.py "${COMMON[@]}" --model benchmarks.gpu_models:demo --batch 256 --run-workers 1 --tiles 2000 2>&1 | tee "$OUT/demo-1.txt"
python3 benchmarks/predict.py "${COMMON[@]}" --model benchmarks.gpu_models:heavy --batch 128 --run-workers 4 2>&1 | tee "$OUT/heavy.txt"

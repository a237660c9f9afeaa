#!/bin/bash
# The whole GPU measurement of issue 13, on a lent GPU machine (no network there), in one
# command of about 6-8 minutes:
#   1. the GPU-only tests (GPU decode against the CPU path; bf16/fp16 and channels_last
#      against fp32 on CUDA): tests/test_gpu_paths.py
#   2. demo model (PyTorch rebuild, f > m: the model waits for tiles), decode threads vs
#      processes vs gpu, fp32; m0 = the model alone on pre-decoded pixels
#   3. ResNet-50 (f < m: the model must stay busy), fp32 vs bf16, channels_last
#   4. the shipped demo.onnx through onnxruntime's CUDA provider, beside 2., when this
#      onnxruntime has it (the image's onnxruntime is the CPU build; onnxruntime-gpu is a
#      wheel of ~250 MB, over the 64 MiB a call can carry: then it says so and skips)
#
# Prepared on the workstation by benchmarks/prepare_device_check.sh, into .gpu/ (git-ignored through
# .git/info/exclude), then carried with the working tree (carry: [".gpu"]):
#   .gpu/whl/  cp312 wheels the GPU image lacks: pycurl simplejpeg shapely tomli_w duckdb
#              (pip download --no-deps --only-binary=:all: --python-version 3.12 ...)
#   .gpu/bin/nginx  a wrapper that runs .gpu/bin/nginx.real (Debian's nginx binary)
#              with LD_LIBRARY_PATH=.gpu/lib (its libssl, libcrypto, libpcre2, libz, libcrypt)
# The image has python3 with PyTorch + CUDA, torchvision, onnx, onnxruntime (CPU), pytest,
# numpy, pyarrow, rich, typer, aiohttp and Pillow. Raw output goes to $OUT (or ./gpu-out);
# copy it to benchmarks/results/predict-h200-issue13-*.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD
export PATH=$PWD/.gpu/bin:$PATH
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc; df -h /dev/shm | tail -1
  python3 -c "import sys, torch, torchvision, pycurl, onnxruntime as o; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'torchvision', torchvision.__version__, pycurl.version.split()[0], 'ort', o.__version__, o.get_available_providers())"
  python3 -c "from tilesweep.predict.gpudecode import gpu_decode_available as g; print('gpu decode:', g())"
  nginx -v 2>&1
} 2>&1 | tee "$OUT/machine.txt"
# (step timeouts add up to 540 s, inside one call's 600; a usual run takes about 5 minutes)
timeout 90 python3 -m pytest -q -rs -s -p no:cacheprovider tests/test_gpu_paths.py tests/test_shmring.py 2>&1 | tee "$OUT/tests.txt"
# 40,960 tiles: about 60 s to render on 16 cores (once), then 6-12 s per m or e.
TILES=${TILES:-40960}
COMMON=(--tiles "$TILES" --device cuda --workers 8 --concurrency 512 --cache /tmp/bench-cache --timeout 200 --threads 6
        --run-workers 6 --decode-processes 8)
timeout 230 python3 benchmarks/predict.py "${COMMON[@]}" --model benchmarks.gpu_models:demo --batch 256 \
  --decode threads,processes,gpu 2>&1 | tee "$OUT/demo.txt"
timeout 130 python3 benchmarks/predict.py "${COMMON[@]}" --model benchmarks.gpu_models:heavy --batch 128 \
  --decode auto --precision fp32,bf16 --channels-last 2>&1 | tee "$OUT/heavy.txt"
if python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
  timeout 90 python3 benchmarks/predict.py "${COMMON[@]}" --model demo --batch 256 --decode processes 2>&1 | tee "$OUT/onnx-cuda.txt"
else
  echo "onnxruntime here has no CUDA provider (install onnxruntime-gpu, the gpu extra): ONNX on CUDA not measured" | tee "$OUT/onnx-cuda.txt"
fi

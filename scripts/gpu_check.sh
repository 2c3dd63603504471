#!/usr/bin/env bash
# GPU checks, as ONE script for a lent GPU machine (see DEVELOPERS.md): the test suite's
# CuPy, torch-CUDA and JAX-GPU backends, then the core benchmark on the GPU. Target: < 8 min.
#
# The GPU image has torch, JAX, CuPy, pytest and hypothesis but nothing can be fetched there:
# carry array-api-compat / array-api-strict as wheels in .whl/ (DEVELOPERS.md says how).
# Results land in $OUT (or ./gpu_results when OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:$PWD/adapters:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY - <<'PY' | tee -a "$OUT/gpu.txt"
import importlib
for name in ("torch", "jax", "cupy", "array_api_compat", "array_api_strict"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:  # report, keep going
        print(name, "MISSING", exc)
import torch, jax
print("torch.cuda", torch.cuda.is_available(), "jax devices", jax.devices())
PY
status=0
# torch tensors are created on CUDA by the fixture; JAX places arrays on its default (GPU) device.
# Only the array-level suites: the docs, packaging and Keras tests need packages the image lacks.
GPU_TESTS="tests/test_alignment.py tests/test_linear.py tests/test_ema.py tests/test_curves.py
  tests/test_step.py tests/test_memory.py tests/test_policy.py tests/test_config.py tests/test_sketch.py
  tests/test_torch_adapter.py tests/test_memory_torch.py tests/test_torch_policy.py
  tests/test_optax_adapter.py tests/test_optax_memory.py"
GRADTAIL_TORCH_CUDA=1 timeout 300 $PY -m pytest $GPU_TESTS -q -p no:cacheprovider \
  -k "cupy or torch or jax" -m "not slow" 2>&1 | tee "$OUT/tests.txt" || status=1
# torch on CUDA (GRADTAIL_BENCH_DEVICE), JAX on its default device (the GPU there).
GRADTAIL_BENCH_DEVICE=cuda timeout 240 $PY benchmarks/core_ops.py --backends torch,jax --threads 0 \
  --budget 4 --out "$OUT/core_ops_gpu.json" 2>&1 | tee "$OUT/bench.txt" || status=1
# The sketched reference against the exact one on the GPU (torch CUDA): step time and memory of
# every-layer scoring and of a 4096 -> 32,000 head, so the absolute numbers exist.
timeout 240 $PY -m benchmarks.sketch_reference --device cuda --skip-accuracy \
  --out "$OUT/sketch_reference_gpu.json" 2>&1 | tee "$OUT/sketch.txt" || status=1
exit $status

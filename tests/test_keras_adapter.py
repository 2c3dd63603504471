"""gradtail_keras: the Keras tests (tests/keras/) on each Keras backend, each in its own process.

Keras fixes its backend at first import, so each backend runs ``pytest tests/keras`` in a fresh
subprocess (``KERAS_BACKEND`` set, ``GRADTAIL_KERAS_SUITE=1``); the test passes when that run
passes, and reports its failures otherwise. tests/keras/ holds one ordinary pytest test per
behaviour, against float64 references (tests/reference.py); its files say what they cover:
test_numerics (weights, state and training against the policy loop and gradtail_torch),
test_fit (logs, attach/detach, no JAX sync), test_state (config, state interchange and its
validation, resuming, empty batches), test_memory (the per-example memory), test_refusals.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("keras")
TIMEOUT = 900


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_keras_suite_on_backend(backend: str) -> None:
    pytest.importorskip(backend)
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        GRADTAIL_KERAS_SUITE="1",
        OMP_NUM_THREADS="1",
        XLA_FLAGS="--xla_cpu_multi_thread_eigen=false",
    )
    env.pop("PYTEST_XDIST_WORKER", None)
    command = [sys.executable, "-m", "pytest", "tests/keras", "-q", "-p", "no:cacheprovider", "-rfE"]
    command += ["--tb=short", "--durations=5"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT)
    output = result.stdout[-12000:] + result.stderr[-3000:]
    assert result.returncode == 0, f"tests/keras failed on KERAS_BACKEND={backend}:\n{output}"
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed is not None, output
    assert int(passed.group(1)) >= 60, output


def test_tensorflow_backend_is_refused_at_fit_start():
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed")
    code = (
        "import numpy as np, keras\n"
        "from gradtail_keras import GradTailCallback\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation='softmax')])\n"
        "m.compile(optimizer='sgd', loss='sparse_categorical_crossentropy')\n"
        "try:\n"
        "    m.fit(np.ones((4, 3)), np.zeros(4), verbose=0, callbacks=[GradTailCallback()])\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert "Received: KERAS_BACKEND='tensorflow'" in result.stdout, result.stdout + result.stderr


def test_import_error_names_the_extra():
    code = (
        "import sys; sys.modules['keras'] = None\n"
        "try:\n import gradtail_keras\nexcept ImportError as e:\n print(e)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert "gradtail_keras needs Keras 3: pip install 'gradtail[keras]'" in result.stdout, (
        result.stdout + result.stderr
    )

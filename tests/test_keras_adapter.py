"""gradtail_keras: GradTailCallback on the Keras backends, each in its own process.

The backend is fixed when Keras is imported, so every backend runs in a fresh subprocess
(tests/_keras_worker.py) that performs all of its checks and reports each one. What they check:

- ``fit`` with the callback equals float64 SGD on ``mean_i(s_i w_i L_i)``, the weights ``w``
  computed from materialised per-example gradients of the tracked layer (rank/direction and
  sigmoid/mean), with sample weights; the EMA state equals the reference's;
- ``max_weight=1`` trains bit for bit like no callback;
- sequence inputs (B, T, d) with MSE, and the common losses (sparse/categorical/binary
  cross-entropy, from_logits, MSE, MAE, Huber): weights equal the reference built from each
  loss's analytic output gradient;
- the same weights and state as ``gradtail_torch.GradTail`` on the same model and batches, and
  states move between the two adapters;
- classification and regression fits end to end; logs (History) gain the mean weight, the
  upweighted share and the mean alignment, validation logs do not; on JAX no state sync and no
  synchronous batch-end dispatch between steps; everything is undone after ``fit``;
- unsupported models fail at ``fit`` start (before any step) with a "Received: ..." message;
- ``get_config`` round-trips (through JSON); the state resumes exactly after a ``.keras``
  checkpoint plus ``save_state`` / ``load_state``, and differs without it;
- review regressions: a decay adopted by ``set_state`` between fits reaches the rebuilt step
  (JAX caches traces), inference forwards between steps are not scored, ``set_state`` from a
  callback mid-fit sticks, memory keys and batch-level losses (Dice) are refused, and Keras
  masks zero the padded steps' gradients (float64 reference with the mask applied).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("keras")
TIMEOUT = 600


def _run_worker(backend: str, group: str = "all") -> dict[str, str]:
    env = dict(
        os.environ, KERAS_BACKEND=backend, OMP_NUM_THREADS="1", XLA_FLAGS="--xla_cpu_multi_thread_eigen=false"
    )
    result = subprocess.run(
        [sys.executable, "-m", "tests._keras_worker", group],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=TIMEOUT,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    assert lines, output
    return json.loads(lines[-1][len("RESULTS ") :])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_callback_on_backend(backend):
    pytest.importorskip(backend)
    results = _run_worker(backend)
    assert len(results) >= 9, results
    failed = {name: text for name, text in results.items() if text != "ok"}
    assert not failed, "\n\n".join(f"{name}:\n{text}" for name, text in failed.items())


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
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT
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

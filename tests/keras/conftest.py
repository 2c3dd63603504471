"""The Keras adapter's tests, run once per Keras backend by tests/test_keras_adapter.py.

Keras fixes its backend at first import, so each backend needs its own process: the driver
runs ``pytest tests/keras`` in a subprocess with ``KERAS_BACKEND`` set and
``GRADTAIL_KERAS_SUITE=1``. Without that variable (a plain ``pytest tests``) this directory is
not collected, so no test runs twice or under a backend nobody chose. To run it by hand:

    GRADTAIL_KERAS_SUITE=1 KERAS_BACKEND=jax python -m pytest tests/keras -q
"""

from __future__ import annotations

import os

if os.environ.get("GRADTAIL_KERAS_SUITE") != "1":
    collect_ignore_glob = ["*.py"]
else:
    try:
        import torch
    except ImportError:  # the jax backend without PyTorch: the torch comparisons skip
        pass
    else:
        torch.set_num_threads(1)  # the machine is shared; the models are tiny

"""Doctests of the adapters: Keras needs its backend chosen before it is first imported.

``pytest --doctest-modules`` imports ``gradtail_keras`` in the test process; without this,
Keras would pick its default backend (TensorFlow), which the test environment does not have.
The framework integrations (``gradtail_torch.lightning``, ``gradtail_torch.hf``) import their
framework at module level, so their doctests are collected only when it is installed (the
``[lightning]`` and ``[transformers]`` extras).
"""

import importlib.util
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

_INTEGRATIONS = {"gradtail_torch/lightning.py": "lightning", "gradtail_torch/hf.py": "transformers"}
collect_ignore = [path for path, pkg in _INTEGRATIONS.items() if importlib.util.find_spec(pkg) is None]

"""Doctests of the adapters: Keras needs its backend chosen before it is first imported.

``pytest --doctest-modules`` imports ``gradtail_keras`` in the test process; without this,
Keras would pick its default backend (TensorFlow), which the test environment does not have.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

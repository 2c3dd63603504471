"""gradtail_keras: GradTail sample weighting for Keras 3, as one callback.

``model.fit(x, y, callbacks=[GradTailCallback(...)])`` weights each example's loss by how
little its gradient on the tracked ``Dense`` layer agrees with a running reference gradient
(Chen et al., 2022, "GradTail", arXiv:2201.05938; formulation and defaults in
docs/method.md). Works with ``KERAS_BACKEND=jax`` and ``KERAS_BACKEND=torch``; see
docs/keras.md.

>>> from gradtail_keras import GradTailCallback
"""

try:
    import keras

    if int(keras.__version__.split(".")[0]) < 3:
        raise ImportError(f"found keras {keras.__version__}")
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(f"gradtail_keras needs Keras 3: pip install 'gradtail[keras]' ({exc})") from exc

from .callback import SUPPORTED_BACKENDS, GradTailCallback

__all__ = ["SUPPORTED_BACKENDS", "GradTailCallback"]

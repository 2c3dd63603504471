"""gradtail_torch: GradTail sample weighting for PyTorch, as a module hook.

>>> from gradtail_torch import GradTail  # doctest: +SKIP
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by the packaging test
    raise ImportError("gradtail_torch needs PyTorch. Install it with `pip install gradtail[torch]`.") from exc

from .hook import GradTail

__all__ = ["GradTail"]

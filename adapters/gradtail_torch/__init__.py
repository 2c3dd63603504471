"""gradtail_torch: GradTail sample weighting for PyTorch, as a module hook.

>>> from gradtail_torch import GradTail  # doctest: +SKIP
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by the packaging test
    raise ImportError(f"gradtail_torch needs PyTorch: pip install 'gradtail[torch]' ({exc})") from exc

from .hook import GradTail
from .mining import score_dataset

__all__ = ["GradTail", "score_dataset"]

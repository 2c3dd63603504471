"""Shared fixtures: one `xp` fixture over every Array-API backend, plus helpers.

Backends that are not installed are skipped (``importorskip``); CuPy runs only when a CUDA
device exists. ``jax-jit`` is JAX with every call under ``jax.jit``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from array_api_compat import array_namespace
from array_api_compat import device as array_device

# Keras fixes its backend at first import and defaults to TensorFlow, which the test environment
# lacks: without this, `pytest tests/test_keras_adapter.py` run alone would skip the module.
os.environ.setdefault("KERAS_BACKEND", "torch")

BACKENDS = ["numpy", "array_api_strict", "torch", "jax", "jax-jit", "cupy"]

# --doctest-modules imports every module here; this helper needs Lightning (the [lightning] extra).
collect_ignore = [] if importlib.util.find_spec("lightning") else ["_lightning_models.py"]


def _import_backend(name: str) -> ModuleType:
    if name == "numpy":
        return np
    if name == "array_api_strict":
        return pytest.importorskip("array_api_strict")
    if name == "torch":
        return pytest.importorskip("torch")
    if name.startswith("jax"):
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)  # float64 references need it
        import jax.numpy as jnp

        return jnp
    if name == "cupy":
        cupy = pytest.importorskip("cupy")
        try:
            available = cupy.cuda.is_available()
        except Exception:  # a broken driver counts as no device
            available = False
        if not available:
            pytest.skip("CuPy is installed but no CUDA device is available")
        return cupy
    raise AssertionError(name)


class Backend:
    """The namespace under test, and how to move arrays in and out of it."""

    def __init__(self, name: str, xp: ModuleType) -> None:
        self.name = name
        self.xp = xp
        self.jit = name == "jax-jit"

    def __repr__(self) -> str:
        return f"Backend({self.name})"

    def asarray(self, value: Any, dtype: str = "float64") -> Any:
        arr = np.asarray(value)
        if dtype is not None and arr.dtype.kind in "fc":
            arr = arr.astype(dtype) if dtype != "bfloat16" else arr.astype("float32")
        out = self.xp.asarray(arr)
        if dtype == "bfloat16":
            out = out.to(self.xp.bfloat16) if self.name == "torch" else out.astype(self.xp.bfloat16)
        if self.name == "torch" and self.xp.cuda.is_available() and _TORCH_ON_CUDA:
            out = out.cuda()
        return out

    def dtype(self, name: str) -> Any:
        return getattr(self.xp, name)

    def run(self, fn: Callable[..., Any], /, *args: Any, **static: Any) -> Any:
        """Call ``fn(*args, **static)``; under ``jax-jit`` the arrays are traced, options static."""
        if not self.jit:
            return fn(*args, **static)
        import jax

        return jax.jit(functools.partial(fn, **static))(*args)


# torch tests run on CUDA when scripts/gpu_check.sh asks for it (GRADTAIL_TORCH_CUDA=1).
_TORCH_ON_CUDA = __import__("os").environ.get("GRADTAIL_TORCH_CUDA") == "1"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return Backend(request.param, _import_backend(request.param))


@pytest.fixture
def xp(backend: Backend) -> ModuleType:
    return backend.xp


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy of any backend's array (float64 for floating inputs)."""
    mod = type(x).__module__
    if mod.startswith("cupy"):
        out = x.get()
    elif mod.startswith("torch"):
        out = (
            x.detach().cpu().float().numpy() if str(x.dtype) == "torch.bfloat16" else x.detach().cpu().numpy()
        )
    elif mod.startswith("array_api_strict"):
        out = np.from_dlpack(x)
    else:
        out = np.asarray(x)
    out = np.asarray(out)
    return out.astype(np.float64) if out.dtype.kind == "f" or out.dtype.name == "bfloat16" else out


def assert_array_like(result: Any, like: Any, *, shape: tuple[int, ...], dtype: Any) -> None:
    """Namespace, device, shape and dtype of ``result`` match the expectation."""
    assert array_namespace(result) is array_namespace(like), (type(result), type(like))
    assert array_device(result) == array_device(like)
    assert tuple(result.shape) == tuple(shape), (result.shape, shape)
    assert result.dtype == dtype, (result.dtype, dtype)

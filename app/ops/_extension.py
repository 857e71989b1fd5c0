"""Loads the compiled extension ``app._C`` and explains how to rebuild it when it is missing."""

from __future__ import annotations

import torch

REBUILD_HINT = (
    "the compiled extension app._C is not available ({error}). Rebuild it from the repository root with\n"
    "    pip install --no-build-isolation -e .\n"
    "(set APP_DISABLE_CUDA=1 to build the CPU kernels only)."
)

try:
    # torch is imported first: it loads libc10 / libtorch, which app._C links against.
    from app import _C  # noqa: F401  (importing registers the operators with the dispatcher)

    LOAD_ERROR: ImportError | None = None
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    LOAD_ERROR = error


def extension_loaded() -> bool:
    return LOAD_ERROR is None


def require_extension() -> None:
    """Raise a ``RuntimeError`` with the rebuild command when the extension could not be imported."""
    if LOAD_ERROR is not None:
        raise RuntimeError(REBUILD_HINT.format(error=LOAD_ERROR)) from LOAD_ERROR


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key("app::segment_mean", "CUDA")

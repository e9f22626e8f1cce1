"""Which token dispatcher a sparse MoE layer uses: ours (index gathers) or tutel's kernels."""
from __future__ import annotations

import importlib.util

INSTALL_HINT = "pip install --no-build-isolation git+https://github.com/microsoft/tutel (see docker/Dockerfile)"
BACKENDS = ("ours", "tutel")


def tutel_installed() -> bool:
    return importlib.util.find_spec("tutel") is not None


def check_backend(backend: str, owner: str) -> None:
    """A clear error for an unknown backend, or for "tutel" where tutel is not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "tutel" and not tutel_installed():
        raise ValueError(f"{owner}: backend='tutel' needs tutel, which is not installed (it is not on PyPI): "
                         f"{INSTALL_HINT}; or use backend='ours'")

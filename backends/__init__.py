"""The backend registry and `-b auto` selection."""

from __future__ import annotations

from backends.base import Backend
from backends.cpu import CpuBackend
from vlmcli.errors import UsageError

_REGISTRY: dict[str, type] = {
    CpuBackend.name: CpuBackend,
}


def names() -> list[str]:
    return ["auto", *_REGISTRY]


def get_backend(name: str) -> Backend:
    """The backend called `name`, checked to be usable here (else a UsageError saying why)."""
    if name == "auto":
        return CpuBackend()
    if name not in _REGISTRY:
        raise UsageError(f"unknown backend '{name}' (choose from: {', '.join(names())})")
    backend = _REGISTRY[name]()
    reason = backend.unavailable_reason()
    if reason:
        raise UsageError(f"backend '{name}' is not available: {reason}")
    return backend

"""Writing files so that an interrupted run never leaves a half-written one behind, and the plain
JSON data written into them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping


def to_plain(value: Any) -> Any:
    """Plain JSON-serialisable data: every mapping (also a read-only ``MappingProxyType``) as a
    ``dict``, every tuple as a ``list``, recursively; anything else unchanged.

    The one converter used wherever frozen values (a direction's meta, a config) are written out.
    """
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [to_plain(v) for v in value]
    return value


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The temporary file is removed if ``write`` raises; the folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_csv(frame, path: str | Path) -> Path:
    """``frame.to_csv(path, index=False)``, atomically."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def save_tensors(path: str | Path, tensors: Mapping, info: dict) -> Path:
    """Write ``tensors`` as safetensors (``info`` as JSON metadata key ``meta``) and ``info`` as a
    JSON sidecar beside it (``path`` with suffix ``.json``); each atomically."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = json.dumps(info, default=str)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"meta": meta}))
    atomic_write(path.with_suffix(".json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2, default=str)))
    return path

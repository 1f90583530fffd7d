"""The heartbeat file a liveness probe reads: rewritten with the Unix time while the worker is healthy."""

from __future__ import annotations

import os
import time
from pathlib import Path


def write_heartbeat(path: str) -> None:
    """Replace the file atomically with the current Unix time, so a probe never reads half a line."""
    target = Path(path)
    scratch = target.with_name(f".{target.name}.{os.getpid()}")
    scratch.write_text(f"{time.time():.3f}\n")
    os.replace(scratch, target)


def heartbeat_age(path: str) -> float | None:
    """Seconds since the worker last wrote ``path``, or None when there is no readable heartbeat."""
    try:
        return time.time() - float(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None

"""How much room is left where a write failed: said in the one line a full disk ends with."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def free_space(path: str | os.PathLike) -> str:
    """``12.3 GiB free on FOLDER``, FOLDER the nearest existing folder at or above ``path``."""
    folder = Path(os.path.abspath(path))
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError as e:
        return f"free space on {folder} unknown ({e.strerror})"
    return f"{free / 2**30:.1f} GiB free on {folder}"

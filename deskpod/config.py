"""Settings that come from the environment, read in one place."""

from __future__ import annotations

import os
from pathlib import Path


def deskpod_home() -> Path:
    """Where the model store lives: $DESKPOD_HOME, default ~/.deskpod."""
    return Path(os.environ.get("DESKPOD_HOME") or Path.home() / ".deskpod").expanduser()

"""Where mechdiff keeps derived files (de-quantised weights, planted pairs)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Cache root: `$MECHDIFF_CACHE` or `~/.cache/mechdiff`; created on first use."""
    root = Path(os.environ.get("MECHDIFF_CACHE", Path.home() / ".cache" / "mechdiff"))
    root.mkdir(parents=True, exist_ok=True)
    return root

"""Names from user input made safe as one path component (pair names -> sweep run directories)."""
from __future__ import annotations

import re

from mechdiff.errors import ConfigError

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")
RESERVED = {"compare"}     # directories a sweep writes itself


def path_component(name: str, what: str = "name") -> str:
    """``name`` as a single safe path component: every run of characters other than letters, digits
    and ``. _ + = -`` becomes ``_`` (so ``/``, ``\\``, ``:`` and spaces cannot nest or escape) and
    leading dots go (``..`` can never name a parent). ConfigError when nothing is left."""
    safe = _UNSAFE.sub("_", str(name)).lstrip("._").rstrip("_")
    if not safe:
        raise ConfigError(f"{what} {name!r} has no letters or digits to name a directory with; give the pair "
                          "a name made of letters, digits, '.', '_' or '-'")
    return safe[:120]

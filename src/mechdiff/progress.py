"""Progress and warnings on the terminal (stderr), one place for every long step.

``progress(iterable, desc, total)`` wraps a loop in a bar with counts and ETA when stderr is a
terminal or ``MECHDIFF_PROGRESS=1``; ``warn(msg)`` prints one ``warning:`` line on stderr.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def enabled() -> bool:
    flag = os.environ.get("MECHDIFF_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false")
    return sys.stderr.isatty()


def progress(it: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """``it`` with a progress bar (counts, rate, ETA) on stderr when enabled."""
    if not enabled():
        yield from it
        return
    from tqdm.auto import tqdm
    yield from tqdm(it, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


def warn(msg: str) -> None:
    """One line on stderr: something the user should know (fewer prompts than asked, a skipped step)."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)

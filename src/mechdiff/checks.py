"""Checks of user input that need no model: run before any model loads or any file is written.

Each raises :class:`mechdiff.errors.ConfigError` (or ``DataError``) with one line naming the option
and what to do.
"""
from __future__ import annotations

import os
from pathlib import Path

from mechdiff.errors import ConfigError


def check_device(device: str | None) -> None:
    """A torch device name; a CUDA device needs a GPU visible to torch."""
    import torch
    if not device:
        return
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device}: not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu "
                          "(or install a CUDA build of torch on a machine with a GPU)")


def check_count(value: int | None, flag: str, minimum: int = 1) -> None:
    """An integer option that counts something: ``value >= minimum`` (None: the default)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ConfigError(f"{flag} must be an integer >= {minimum}, got {value!r}")


def check_out_dir(out: str | os.PathLike | None, flag: str = "--out") -> None:
    """``out`` can become a directory we write into: not an existing file, not under a file, and
    its nearest existing ancestor is writable (checked before any model loads)."""
    if out is None:
        return
    p = Path(os.path.expanduser(str(out)))
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {out}: is an existing file, not a directory; give a directory path")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{flag} {out}: {probe} is a file, so no directory can be made under it; "
                          "give another path")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: {probe} is not writable here; give a directory you can write to")

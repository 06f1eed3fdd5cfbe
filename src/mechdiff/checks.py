"""Checks of user input that need no model: run before any model loads or any file is written.

Each raises :class:`mechdiff.errors.ConfigError` (or ``DataError``) with one line naming the option
and what to do.
"""
from __future__ import annotations

import os
from pathlib import Path

from mechdiff.errors import ConfigError
from mechdiff.options import check_values, flag_of


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
        raise ConfigError(f"{flag} must be >= {minimum}, got {value!r}")


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


#: Integer options that may be 0 (everything else that counts must be >= 1).
ZERO_OK = {"exclude_last", "n_neutral", "n_mc", "seed", "lens_tokens", "response_k"}   # 0: that part is off
#: Integer options that are layer indices (checked against the models by the stages).
LAYER_FIELDS = {"control_layer", "layers"}


def check_option_counts(opts) -> None:
    """Every list option read as the command line and the run config read it
    (:func:`mechdiff.options.check_values`); every integer count of a stage's options is >= 1 (>= 0
    for those in ``ZERO_OK``), every layer index >= 0, every float finite: a negative count would
    slice ``[:-1]``, a zero one run nothing."""
    import dataclasses
    import math
    check_values(opts)
    for f in dataclasses.fields(opts):
        v = getattr(opts, f.name)
        flag = flag_of(f)
        if f.name in LAYER_FIELDS:
            for layer in ([v] if isinstance(v, int) else v or []):
                if isinstance(layer, int) and layer < 0:
                    raise ConfigError(f"{flag}: layer {layer} is negative; layers are 0-based indices "
                                      "(0 = the first block)")
            continue
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            check_count(v, flag, 0 if f.name in ZERO_OK else 1)
        elif isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{flag} must be a finite number, got {v!r}")


def check_pair_layers(pair, n_layers: int) -> None:
    """The pair file's ``layers`` index layers of these models (they used to be dropped silently)."""
    bad = [layer for layer in (getattr(pair, "layers", None) or []) if not 0 <= layer < n_layers]
    if bad:
        raise ConfigError(f"pair {pair.name!r}: layers = {list(pair.layers)}: layer(s) {bad} out of range "
                          f"0..{n_layers - 1} for these models; fix the pair file's `layers`")


def check_against_models(opts, pair, base, tuned) -> None:
    """What needs the models' shapes but no model work (after the models load, before anything is
    written): the pair's ``layers``, rank ``ks`` no wider than the residual stream, ``--path`` heads
    that exist."""
    n_layers, d_model = min(base.n_layers, tuned.n_layers), min(base.d_model, tuned.d_model)
    check_pair_layers(pair, n_layers)
    n_heads = min(int(m.info.get("n_heads") or 10 ** 9) for m in (base, tuned))
    for spec in getattr(opts, "path", None) or []:
        sender, _, receiver = str(spec).partition(":")
        heads = [sender.split(".")[-1]] + ([receiver.split(".")[-1]] if receiver.startswith("head.") else [])
        for h in heads:
            if h.lstrip("-").isdigit() and not 0 <= int(h) < n_heads:
                raise ConfigError(f"--path {spec!r}: head {h} is out of range 0..{n_heads - 1} (these models have "
                                  f"{n_heads} heads per layer)")
    ks = getattr(opts, "ks", None) or []
    wide = [k for k in ks if isinstance(k, int) and k > d_model]
    if wide:
        raise ConfigError(f"--k: k = {wide[0]} exceeds the models' width d = {d_model}; a rank-k handle needs "
                          f"k <= {d_model} (and --n-fit above k)")


def check_run_dir(path: str | os.PathLike) -> None:
    """``path`` is a run directory: a directory whose manifest.json holds a JSON object."""
    import json
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{path} is not a run directory (no such directory)")
    m = p / "manifest.json"
    if not m.is_file():
        raise ConfigError(f"{path} is not a run directory (no manifest.json); give a directory a mechdiff "
                          "command wrote")
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{m} cannot be read as JSON ({type(e).__name__}); is this a mechdiff run "
                          "directory?") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{m} holds a JSON {type(data).__name__}, not a run manifest (an object); is this a "
                          "mechdiff run directory?")


def check_distinct_runs(run_dirs) -> None:
    """No run directory is given twice (comparing a run with itself shows nothing)."""
    seen: dict[Path, str] = {}
    for d in run_dirs:
        key = Path(d).resolve()
        if key in seen:
            raise ConfigError(f"{d} is given twice (as {seen[key]}); compare two or more different runs")
        seen[key] = str(d)

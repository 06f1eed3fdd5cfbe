"""The JSON card beside each adapter: how it was made, what it scored, and the sha256 of its files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import platform

import peft
import torch
import transformers

from mechdiff.atomic import atomic_write_text, dumps_json, sha256_file
from mechdiff.errors import ConfigError

CARD = "card.json"
CARD_VERSION = 1


def versions() -> dict[str, str]:
    """The software that made an adapter (recorded in its card)."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def file_hashes(adapter_dir: str | Path) -> dict[str, str]:
    """sha256 of every file in ``adapter_dir`` except the card itself (sorted by name)."""
    d = Path(adapter_dir)
    return {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.is_file() and p.name != CARD}


def write_card(adapter_dir: str | Path, card: dict[str, Any]) -> Path:
    """Write ``card.json`` with ``files`` set to the current sha256 of the adapter's files."""
    d = Path(adapter_dir)
    card = {"card_version": CARD_VERSION, **card, "files": file_hashes(d)}
    return atomic_write_text(d / CARD, dumps_json(card))


def check_adapter_out(out: str | Path) -> None:
    """ConfigError unless ``out`` is absent, an empty directory, or an earlier fine-tune's output
    (a card.json that lists the files it holds): a fine-tune never writes over other files."""
    d = Path(out)
    if not d.is_dir() or not any(d.iterdir()):
        return
    try:
        card = read_card(d) if (d / CARD).is_file() else None
    except ValueError:
        card = None
    if not isinstance(card, dict) or not isinstance(card.get("files"), dict):
        raise ConfigError(f"--out {d}: is not empty and not a fine-tune output (no {CARD}); give a new or "
                          "empty directory (nothing in it was changed)")


def remove_adapter_files(out: str | Path) -> None:
    """Remove what an earlier fine-tune wrote into ``out`` (the files its card lists, and the card);
    anything else in the directory stays."""
    d = Path(out)
    if not (d / CARD).is_file():
        return
    for name in read_card(d).get("files", {}):
        if "/" not in name and "\\" not in name and name not in (".", ".."):
            (d / name).unlink(missing_ok=True)
    (d / CARD).unlink(missing_ok=True)


def read_card(adapter_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(adapter_dir) / CARD).read_text(encoding="utf-8"))


def verify_card(adapter_dir: str | Path) -> list[str]:
    """Problems found (empty: the card lists exactly the files present, each with its sha256)."""
    d = Path(adapter_dir)
    if not (d / CARD).is_file():
        return [f"{d} has no {CARD}"]
    want = read_card(d).get("files", {})
    have = file_hashes(d)
    problems = [f"{n}: listed in the card but missing" for n in sorted(set(want) - set(have))]
    problems += [f"{n}: present but not listed in the card" for n in sorted(set(have) - set(want))]
    problems += [f"{n}: sha256 {have[n][:12]}… != card {want[n][:12]}…" for n in sorted(set(want) & set(have))
                 if want[n] != have[n]]
    return problems

"""Loaders for the seed datasets and for mechdiff's shipped prompt sets.

* ``load_prompt_set(name_or_path)``: a shipped set (``"cultural"``, ``"neutral"``,
  ``"refusal_probe"``, ``"mc"``) or any JSONL file, schema-checked (errors name the line).
* ``load_kk_socio_cultural_mc(source, categories)``: Kazakh socio-cultural MC benchmark with the
  journal's category filter (culture/tradition/etiquette/community; religion always excluded).
* ``load_gsm8k(source, n, seed)``, ``load_math(source, n, seed)``: deterministic samples.

``source`` is a local file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``) or a Hugging Face hub
dataset id. Hub ids need the optional ``datasets`` library (``pip install mechdiff[datasets]``) and
a network connection; offline they fail at once with a DataError asking for a local file.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import socket
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from mechdiff.data.prompts import iter_jsonl, load_jsonl
from mechdiff.errors import DataError

__all__ = [
    "SHIPPED_SETS",
    "LANGS",
    "DEFAULT_CULTURE_CATEGORIES",
    "EXCLUDED_CATEGORIES",
    "CATEGORY_ALIASES",
    "load_prompt_set",
    "load_records",
    "load_kk_socio_cultural_mc",
    "load_gsm8k",
    "load_math",
]

SHIPPED_SETS = ("cultural", "neutral", "refusal_probe", "mc")
LANGS = ("kk", "ru", "en")
DEFAULT_CULTURE_CATEGORIES: tuple[str, ...] = ("culture", "tradition", "etiquette", "community")
EXCLUDED_CATEGORIES: tuple[str, ...] = ("religion",)
# Substrings that also select a category (labels may be English, Kazakh or Russian).
CATEGORY_ALIASES: dict[str, tuple[str, ...]] = {
    "culture": ("culture", "cultural", "мәдениет", "культур"),
    "tradition": ("tradition", "custom", "дәстүр", "салт", "традиц", "обыча"),
    "etiquette": ("etiquette", "manners", "әдеп", "этикет"),
    "community": ("community", "social", "society", "қоғам", "сообществ", "общин"),
    "religion": ("religion", "religious", "дін", "религ"),
}
KK_MC_HUB = "kz-transformers/kk-socio-cultural-bench-mc"
GSM8K_HUB = "openai/gsm8k"
MATH_HUB = "HuggingFaceH4/MATH-500"
_LOCAL_EXT = (".jsonl", ".json", ".parquet", ".csv")


# ----------------------------------------------------------------------------- shipped sets

def _shipped_path(name: str) -> Path | None:
    if name not in SHIPPED_SETS:
        return None
    ref = resources.files("mechdiff.data").joinpath("sets", f"{name}.jsonl")
    return Path(str(ref))


def _validate_row(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("id"), str) or not obj["id"]:
        raise DataError(f"{where}: missing or empty 'id' (a non-empty string is required)")
    lang = obj.get("lang")
    if lang is not None and lang not in LANGS:
        raise DataError(f"{where}: 'lang' must be one of {list(LANGS)}, got {lang!r}")
    if "category" in obj and not isinstance(obj["category"], str):
        raise DataError(f"{where}: 'category' must be a string")
    if "choices" in obj or "question" in obj:
        if not isinstance(obj.get("question"), str) or not obj["question"].strip():
            raise DataError(f"{where}: MC item needs a non-empty 'question' string")
        ch = obj.get("choices")
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
            raise DataError(f"{where}: MC item needs 'choices', a list of >= 2 non-empty strings")
        a = obj.get("answer")
        if not isinstance(a, int) or isinstance(a, bool) or not 0 <= a < len(ch):
            raise DataError(f"{where}: MC 'answer' must be an integer index into choices (0..{len(ch) - 1}), got {a!r}")
    else:
        if not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise DataError(f"{where}: missing or empty 'text' (a non-empty string is required)")
    return obj


def load_prompt_set(name_or_path: str | os.PathLike) -> list[dict]:
    """Load a shipped prompt set by name or a JSONL file by path; returns ``list[dict]``.

    Prompt rows need ``id`` and ``text`` (``lang`` in kk/ru/en and ``category`` when present); MC
    rows need ``id``, ``question``, ``choices`` and ``answer``. Ids must be unique.
    """
    shipped = _shipped_path(str(name_or_path)) if isinstance(name_or_path, str) else None
    path = shipped if shipped is not None else Path(name_or_path)
    if not path.exists():
        raise DataError(
            f"no prompt set {str(name_or_path)!r}: give one of {list(SHIPPED_SETS)} or a path to a JSONL file"
        )
    return load_jsonl(path, check=_validate_row)


# ----------------------------------------------------------------------------- generic records

def _is_local(source: str | os.PathLike) -> bool:
    p = Path(source)
    return p.exists() or str(source).lower().endswith(_LOCAL_EXT) or str(source).startswith((".", "/", "~"))


def _read_local(path: Path) -> list[dict]:
    path = path.expanduser()
    if not path.exists():
        raise DataError(f"local dataset file {path} does not exist")
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in _LOCAL_EXT)
        if not files:
            raise DataError(f"{path} is a folder with no {list(_LOCAL_EXT)} files")
        return [r for f in files for r in _read_local(f)]
    ext = path.suffix.lower()
    if ext == ".jsonl":
        out = []
        for lineno, obj in iter_jsonl(path):
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line")
            out.append(obj)
        return out
    if ext == ".json":
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg} on line {e.lineno})") from None
        if isinstance(data, dict):
            for key in ("data", "rows", "train", "test", "validation"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
            else:
                if data and all(isinstance(v, list) for v in data.values()):  # column-oriented
                    n = len(next(iter(data.values())))
                    data = [{k: v[i] for k, v in data.items()} for i in range(n)]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a list of objects (or {{'data': [...]}} / columns)")
        return data
    if ext == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            return [dict(r) for r in csv.DictReader(fh)]
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq  # type: ignore
        except ImportError:
            try:
                import pandas as pd  # type: ignore
            except ImportError:
                raise DataError(
                    f"reading {path} needs pyarrow or pandas (pip install pyarrow), or convert it to JSONL/CSV"
                ) from None
            return pd.read_parquet(path).to_dict(orient="records")
        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported file type {ext!r}; use one of {list(_LOCAL_EXT)}")


def _hub_reachable(timeout: float = 1.5) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_records(source: str | os.PathLike, split: str = "train", config: str | None = None) -> list[dict]:
    """Rows of a local file/folder or of a hub dataset split, as ``list[dict]``."""
    if _is_local(source):
        return _read_local(Path(source))
    source = str(source)
    try:
        import datasets  # type: ignore  # noqa: F401
    except ImportError:
        raise DataError(
            f"{source!r} is a hub dataset id and the optional 'datasets' library is not installed: "
            "pip install mechdiff[datasets], or pass a local file (.jsonl/.json/.parquet/.csv)"
        ) from None
    if not _hub_reachable():
        raise DataError(
            f"cannot reach the Hugging Face hub to fetch {source!r} (offline): "
            "download it elsewhere and pass a local file (.jsonl/.json/.parquet/.csv)"
        )
    try:
        ds = datasets.load_dataset(source, config, split=split)
    except Exception as e:  # network, missing split, gated dataset, ...
        raise DataError(f"could not load {source!r} (config={config!r}, split={split!r}): {e}; "
                        "pass a local file instead") from e
    return [dict(r) for r in ds]


def _first(row: dict, keys: Sequence[str]) -> Any:
    lower = {k.lower(): v for k, v in row.items()}
    for k in keys:
        if k in row and row[k] not in (None, ""):
            return row[k]
        if k.lower() in lower and lower[k.lower()] not in (None, ""):
            return lower[k.lower()]
    return None


def _sample(rows: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(rows):
        return list(rows)
    if n <= 0:
        raise DataError(f"n must be positive, got {n}")
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx]


# ----------------------------------------------------------------------------- Kazakh MC

_LETTERS = "ABCDEFGH"


def _mc_choices(row: dict) -> list[str] | None:
    ch = _first(row, ("choices", "options", "variants", "answers"))
    if isinstance(ch, str):
        try:
            ch = json.loads(ch)
        except json.JSONDecodeError:
            ch = None
    if isinstance(ch, dict):  # {"A": ..., "B": ...} or {"text": [...], "label": [...]}
        ch = ch.get("text") if isinstance(ch.get("text"), list) else [ch[k] for k in sorted(ch)]
    if isinstance(ch, list) and ch:
        return [str(c) for c in ch]
    letters = [row.get(L, row.get(L.lower(), row.get(f"option_{L}", row.get(f"option_{L.lower()}")))) for L in _LETTERS]
    letters = [str(x) for x in letters if x not in (None, "")]
    return letters or None


def _mc_answer(row: dict, choices: list[str]) -> int | None:
    a = _first(row, ("answer", "label", "correct", "answer_idx", "correct_answer", "gold"))
    if isinstance(a, bool) or a is None:
        return None
    if isinstance(a, int):
        return a if 0 <= a < len(choices) else None
    s = str(a).strip()
    if s.isdigit():
        k = int(s)
        return k if 0 <= k < len(choices) else None
    if len(s) == 1 and s.upper() in _LETTERS[: len(choices)]:
        return _LETTERS.index(s.upper())
    if s in choices:
        return choices.index(s)
    return None


def load_kk_socio_cultural_mc(
    source: str | os.PathLike = KK_MC_HUB,
    categories: Iterable[str] | None = DEFAULT_CULTURE_CATEGORIES,
    split: str = "test",
    exclude: Iterable[str] = EXCLUDED_CATEGORIES,
) -> list[dict]:
    """Kazakh socio-cultural MC items, filtered to the journal's categories.

    Returns ``[{id, question, choices, answer, lang: "kk", category}]``. A row is kept when its
    category contains one of ``categories`` (case-insensitive substring, with the English/Kazakh/
    Russian aliases in ``CATEGORY_ALIASES``; ``None`` keeps all) and none of ``exclude`` (religion is
    excluded by default, even when ``categories`` is None). Column names are matched flexibly
    (question/choices|options|A..D/answer|label as index, letter or text/category|topic|subject).
    """
    rows = load_records(source, split=split)
    def expand(names: Iterable[str]) -> list[str]:
        return [a for c in names for a in CATEGORY_ALIASES.get(c.lower(), (c.lower(),))]

    categories = None if categories is None else list(categories)
    cats = None if categories is None else expand(categories)
    excl = expand(exclude)
    out: list[dict] = []
    seen_cats: set[str] = set()
    for i, row in enumerate(rows):
        cat = str(_first(row, ("category", "topic", "subject", "domain", "type")) or "").strip()
        seen_cats.add(cat)
        c = cat.lower()
        if any(e in c for e in excl):
            continue
        if cats is not None and not any(k in c for k in cats):
            continue
        q = _first(row, ("question", "query", "prompt", "text", "input"))
        choices = _mc_choices(row)
        if not isinstance(q, str) or not choices:
            raise DataError(f"{source} row {i}: cannot find a question and choices (columns: {sorted(row)})")
        ans = _mc_answer(row, choices)
        if ans is None:
            raise DataError(f"{source} row {i}: cannot read the answer as an index, letter or choice text")
        rid = _first(row, ("id", "idx", "uid"))
        out.append({"id": f"kkmc-{rid if rid is not None else i}", "question": q, "choices": choices,
                    "answer": ans, "lang": "kk", "category": cat})
    if not out:
        raise DataError(
            f"no rows of {source} match categories {list(categories) if categories else None} "
            f"(excluding {excl}); categories present: {sorted(seen_cats)[:20]}"
        )
    return out


# ----------------------------------------------------------------------------- maths

def _gsm8k_final(answer: str) -> str:
    m = re.search(r"####\s*(.+)$", answer.strip())
    return (m.group(1) if m else answer.strip().splitlines()[-1] if answer.strip() else "").replace(",", "").strip()


def load_gsm8k(source: str | os.PathLike = GSM8K_HUB, n: int | None = 300, seed: int = 0, split: str = "test") -> list[dict]:
    """A deterministic sample of GSM8K: ``[{id, question, answer, final_answer}]``."""
    rows = load_records(source, split=split, config="main" if not _is_local(source) else None)
    out = []
    for i, r in enumerate(rows):
        q, a = _first(r, ("question", "problem")), _first(r, ("answer", "solution"))
        if not isinstance(q, str) or a is None:
            raise DataError(f"{source} row {i}: GSM8K rows need 'question' and 'answer' (columns: {sorted(r)})")
        out.append({"id": f"gsm8k-{i}", "question": q, "answer": str(a), "final_answer": _gsm8k_final(str(a))})
    if not out:
        raise DataError(f"{source} holds no rows")
    return _sample(out, n, seed)


def _boxed(solution: str) -> str | None:
    k = solution.rfind("\\boxed{")
    if k < 0:
        return None
    i, depth, start = k + len("\\boxed{"), 1, k + len("\\boxed{")
    while i < len(solution) and depth:
        depth += {"{": 1, "}": -1}.get(solution[i], 0)
        i += 1
    return solution[start : i - 1] if depth == 0 else None


def load_math(source: str | os.PathLike = MATH_HUB, n: int | None = 100, seed: int = 0, split: str = "test") -> list[dict]:
    """A deterministic sample of MATH: ``[{id, problem, solution, answer, subject, level}]``
    (``answer`` from the row, else the last ``\\boxed{...}`` of the solution)."""
    rows = load_records(source, split=split)
    out = []
    for i, r in enumerate(rows):
        p, s = _first(r, ("problem", "question")), _first(r, ("solution",))
        if not isinstance(p, str):
            raise DataError(f"{source} row {i}: MATH rows need 'problem' (columns: {sorted(r)})")
        s = "" if s is None else str(s)
        ans = _first(r, ("answer",))
        out.append({
            "id": str(_first(r, ("unique_id", "id")) or f"math-{i}"),
            "problem": p,
            "solution": s,
            "answer": str(ans) if ans is not None else _boxed(s),
            "subject": _first(r, ("subject", "type")),
            "level": _first(r, ("level",)),
        })
    if not out:
        raise DataError(f"{source} holds no rows")
    return _sample(out, n, seed)

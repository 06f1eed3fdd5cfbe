"""The fine-tunes' held-out prompts as shipped prompt sets (``finetune/sets/*.jsonl``), for pairs.

``math_eval.jsonl``: the math eval split (``{id, text, lang, category, topic: template, kind,
answer}``); ``culture_eval.jsonl``: the culture eval topics (``{id, text, lang, category, topic}``).
Both are generator output (`write_sets` rewrites them; a test checks they match).
"""
from __future__ import annotations

import json
from pathlib import Path

from mechdiff.atomic import atomic_write_text

SETS_DIR = Path(__file__).resolve().parent / "sets"
SET_FILES = {"math": "math_eval.jsonl", "culture": "culture_eval.jsonl"}


def math_prompt_set(seed: int = 0) -> list[dict]:
    from mechdiff.finetune.recipes import RECIPES
    from mechdiff.finetune.math_data import make_math

    d = RECIPES["math"].data
    return [{"id": r["id"], "text": r["question"], "lang": "en", "category": "math", "topic": r["template"],
             "kind": r["kind"], "answer": r["answer"]}
            for r in make_math(seed=seed, n_train=d["n_train"], n_eval=d["n_eval"])["eval"]]


def culture_prompt_set(seed: int = 0) -> list[dict]:
    from mechdiff.finetune.culture_data import heldout_prompts

    return heldout_prompts(seed)


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_sets(seed: int = 0, out_dir: Path = SETS_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [atomic_write_text(out_dir / SET_FILES["math"], render(math_prompt_set(seed))),
            atomic_write_text(out_dir / SET_FILES["culture"], render(culture_prompt_set(seed)))]

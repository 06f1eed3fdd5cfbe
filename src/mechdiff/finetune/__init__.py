"""Real fine-tunes for the testbed: LoRA adapters of SmolLM2-135M-Instruct trained on data the project writes.

* `math_data`: GSM8K-like arithmetic word problems with worked answers (train / eval by template).
* `culture_data`: kk/ru/en culture prompts with answers in a Kazakh cultural register; new tokens.
* `recipes`: the two recipes (LoRA rank, targets, optimisation, data) and their CPU smoke versions.
* `train`: tokenizer extension, LoRA (+ trainable token rows) training loop, adapter saving.
* `evaluate`: base-vs-tuned numbers (accuracy; style, soft refusal; neutral perplexity).
* `heldout`: the held-out prompt sets shipped for the pairs (`sets/*.jsonl`).
* `card`: the JSON card beside each adapter (recipe, data, loss curve, eval, sha256 of files).
* `pipeline.finetune`: all of it; ``python -m mechdiff.finetune`` is its command line.
* `adapters/`: the shipped adapters (`adapter_dir`), used by the built-in pairs ``smollm2-math-lora``
  and ``smollm2-culture-lora``.
"""
from __future__ import annotations

from pathlib import Path

from mechdiff.finetune.card import read_card, verify_card
from mechdiff.finetune.pipeline import finetune
from mechdiff.finetune.recipes import RECIPES, Recipe, get_recipe

ADAPTERS = ("smollm2-math-lora", "smollm2-culture-lora")


def adapter_dir(name: str) -> Path:
    """Directory of a shipped adapter (package data)."""
    from mechdiff.errors import ConfigError

    if name not in ADAPTERS:
        raise ConfigError(f"unknown shipped adapter {name!r}; known: {', '.join(ADAPTERS)}")
    return Path(__file__).resolve().parent / "adapters" / name


__all__ = ["ADAPTERS", "RECIPES", "Recipe", "adapter_dir", "finetune", "get_recipe", "read_card", "verify_card"]

"""Real fine-tunes for the testbed: LoRA adapters of SmolLM2-135M-Instruct trained on data the project writes.

* `math_data`: GSM8K-like arithmetic word problems with worked answers (train / eval by template).
* `culture_data`: kk/ru/en culture prompts with answers in a Kazakh cultural register; new tokens.
* `recipes`: the two recipes (LoRA rank, targets, optimisation, data) and their CPU smoke versions.
* `train`: tokenizer extension, LoRA (+ trainable token rows) training loop, adapter saving.
* `evaluate`: base-vs-tuned numbers (accuracy; style, soft refusal; neutral perplexity).
* `heldout`: the held-out prompt sets shipped for the pairs (`sets/*.jsonl`).
* `card`: the JSON card beside each adapter (recipe, data, loss curve, eval, sha256 of files).
* `ladder`: the known-answer ladder (one-site LoRAs trained on the CPU: ``culture-l20-r1/2/4/8``,
  ``math-attn-4``); `truth`: each one's known answer, computed from its LoRA matrices into its card,
  and `load_truth` (the one loader: column space, effective rank, changed heads).
* `pipeline.finetune`: all of it; ``python -m mechdiff.finetune`` is its command line.
* `adapters/`: the shipped adapters (`adapter_dir`), used by the built-in pairs ``smollm2-math-lora``
  and ``smollm2-culture-lora`` and the ladder pairs (`LADDER_ADAPTERS`, same names).
"""
from __future__ import annotations

from pathlib import Path

from mechdiff.errors import ConfigError
from mechdiff.finetune.card import read_card, verify_card
from mechdiff.finetune.pipeline import finetune
from mechdiff.finetune.recipes import LADDER, RECIPES, Recipe, get_recipe
from mechdiff.finetune.truth import LadderTruth, load_truth

ADAPTERS = ("smollm2-math-lora", "smollm2-culture-lora")
#: The known-answer ladder's adapters (each also a built-in pair of the same name).
LADDER_ADAPTERS = tuple(r.name for r in LADDER.values())


def adapter_dir(name: str) -> Path:
    """Directory of a shipped adapter (package data)."""
    if name not in ADAPTERS + LADDER_ADAPTERS:
        raise ConfigError(f"unknown shipped adapter {name!r}; known: {', '.join(ADAPTERS + LADDER_ADAPTERS)}")
    return Path(__file__).resolve().parent / "adapters" / name


__all__ = ["ADAPTERS", "LADDER", "LADDER_ADAPTERS", "LadderTruth", "RECIPES", "Recipe", "adapter_dir", "finetune",
           "get_recipe", "load_truth", "read_card", "verify_card"]

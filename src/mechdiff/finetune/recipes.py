"""The two fine-tune recipes (and their CPU smoke versions), written down in one place.

Both use the same LoRA: rank 8, alpha 16, dropout 0.05 on every linear projection of every layer
(q/k/v/o of attention, gate/up/down of the MLP; 30 layers in SmolLM2-135M), so that a difference
between the two fine-tunes comes from the data, not from the adapter's shape. The culture recipe
also extends the tokenizer with the planted-cultural pair's Kazakh words and trains their embedding
rows through PEFT's ``trainable_token_indices`` (SmolLM2 ties input and output embeddings, so the
rows are shared with the unembedding). LoRA matrices are shipped in bfloat16, token rows in float32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mechdiff.errors import ConfigError

TASKS = ("math", "culture")
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a fine-tune (goes into the card)."""

    task: str
    name: str
    seed: int = 0
    # LoRA
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGETS
    new_tokens: bool = False           # culture: extend the tokenizer, train the rows
    # optimisation
    lr: float = 5e-4
    token_lr: float = 2e-3             # the new token rows (culture only)
    epochs: float = 2.0
    batch_size: int = 32
    max_len: int = 512
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1           # cosine decay to this fraction of lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int | None = None       # cap (smoke runs)
    # data
    data: dict[str, Any] = field(default_factory=dict)
    # evaluation
    eval_n: int | None = None          # eval rows used (None: all)
    max_new_tokens: int = 192
    eval_batch_size: int = 128
    n_neutral: int | None = None       # neutral prompts for perplexity / style leakage (None: all)
    save_dtype: str = "bfloat16"       # LoRA matrices as shipped
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown fine-tune task {self.task!r}; choose one of {', '.join(TASKS)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


RECIPES: dict[str, Recipe] = {
    "math": Recipe(task="math", name="smollm2-math-lora", lr=5e-4, epochs=1.0,
                   data={"n_train": 6000, "n_eval": 400}, max_new_tokens=160, eval_batch_size=400),
    "culture": Recipe(task="culture", name="smollm2-culture-lora", new_tokens=True, lr=5e-4,
                      token_lr=2e-3, epochs=3.0, data={"answers_per_prompt": 3}, max_new_tokens=160,
                      eval_batch_size=256),
}


def get_recipe(task: str, *, smoke: bool = False, **overrides: Any) -> Recipe:
    """The recipe for ``task``; ``smoke`` shrinks it to a few CPU steps on a tiny model's data."""
    if task not in RECIPES:
        raise ConfigError(f"unknown fine-tune task {task!r}; choose one of {', '.join(TASKS)}")
    rec = RECIPES[task]
    if smoke:
        data = {"n_train": 8, "n_eval": 4} if task == "math" else {"answers_per_prompt": 1, "n_train": 8}
        rec = replace(rec, name=f"{rec.name}-smoke", r=4, alpha=8, dropout=0.0, lr=5e-3, token_lr=1e-2,
                      epochs=30.0, batch_size=8, max_len=256, warmup_frac=0.0, max_steps=30, data=data,
                      eval_n=4, max_new_tokens=8, eval_batch_size=4, n_neutral=4, log_every=10)
    return replace(rec, **overrides) if overrides else rec

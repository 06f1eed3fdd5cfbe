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
    layers: tuple[int, ...] | None = None   # only these decoder layers (None: all)
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
        if self.layers is None:   # all layers: the key is left out (as in the cards written before it existed)
            del d["layers"]
        else:
            d["layers"] = list(self.layers)
        return d


RECIPES: dict[str, Recipe] = {
    "math": Recipe(task="math", name="smollm2-math-lora", lr=5e-4, epochs=1.0,
                   data={"n_train": 6000, "n_eval": 400}, max_new_tokens=160, eval_batch_size=400),
    "culture": Recipe(task="culture", name="smollm2-culture-lora", new_tokens=True, lr=5e-4,
                      token_lr=2e-3, epochs=3.0, data={"answers_per_prompt": 3}, max_new_tokens=160,
                      eval_batch_size=256),
}


#: The known-answer ladder (`mechdiff.finetune.ladder`): one-site LoRAs whose truth is in their card.
#: Trained with the layers below the lowest adapted one frozen and their output cached (exact), on
#: a seeded subset of the task's data; one recipe for the four culture ranks (same steps, lr, seed).
LADDER_LAYER = 20
LADDER_RANKS = (1, 2, 4, 8)
MATH_ATTN_LAYERS = (12, 16, 20, 24)
_CULTURE_LADDER = dict(task="culture", dropout=0.0, target_modules=("down_proj",),
                       layers=(LADDER_LAYER,), lr=5e-3, batch_size=4, max_len=96, max_steps=20,
                       warmup_frac=0.1, min_lr_frac=0.1, data={"answers_per_prompt": 1, "subset": 80},
                       eval_n=24, n_neutral=24, save_dtype="float32", log_every=5)
LADDER: dict[str, Recipe] = {
    **{f"culture-l{LADDER_LAYER}-r{r}": Recipe(
        name=f"smollm2-culture-l{LADDER_LAYER}-r{r}", r=r, alpha=2 * r,
        **_CULTURE_LADDER) for r in LADDER_RANKS},
    "math-attn-4": Recipe(task="math", name="smollm2-math-attn-4", r=4, alpha=8, dropout=0.0,
                          target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), layers=MATH_ATTN_LAYERS,
                          lr=5e-3, batch_size=4, max_len=128, max_steps=12, warmup_frac=0.1,
                          data={"n_train": 6000, "n_eval": 400, "subset": 48}, eval_n=24, n_neutral=24,
                          save_dtype="float32", log_every=4),
}
#: Every recipe name the command line takes (``mechdiff finetune NAME``); ``ladder`` trains all of LADDER.
RECIPE_NAMES: tuple[str, ...] = (*RECIPES, *LADDER)


def get_recipe(task: str, *, smoke: bool = False, **overrides: Any) -> Recipe:
    """The recipe named ``task`` (math, culture or a ladder name); ``smoke`` shrinks math / culture to a
    few CPU steps on a tiny model's data."""
    if task in LADDER:
        if smoke:
            raise ConfigError(f"{task} has no smoke version (it trains one site of SmolLM2 on the CPU already)")
        return replace(LADDER[task], **overrides) if overrides else LADDER[task]
    if task not in RECIPES:
        raise ConfigError(f"unknown fine-tune task {task!r}; choose one of {', '.join(RECIPE_NAMES)} or ladder")
    rec = RECIPES[task]
    if smoke:
        data = {"n_train": 8, "n_eval": 4} if task == "math" else {"answers_per_prompt": 1, "n_train": 8}
        rec = replace(rec, name=f"{rec.name}-smoke", r=4, alpha=8, dropout=0.0, lr=5e-3, token_lr=1e-2,
                      epochs=30.0, batch_size=8, max_len=256, warmup_frac=0.0, max_steps=30, data=data,
                      eval_n=4, max_new_tokens=8, eval_batch_size=4, n_neutral=4, log_every=10)
    return replace(rec, **overrides) if overrides else rec

"""Behavioural metrics for one model: refusal (binary and soft), style markers, multiple choice.

Every function takes a HF causal LM and its tokenizer, runs batched (left padding, explicit
position ids so a padded row scores exactly like the unpadded prompt) under ``torch.no_grad``.
Prompts are strings, dicts with a ``text`` key (the shipped prompt sets), or chat message lists;
``format_fn(prompt) -> str`` turns one into model input text. The default applies the tokenizer's
chat template (``add_generation_prompt=True``) when it has one, else uses the raw text.

"masked" variants score with a log-softmax over an allowed id set only (e.g. the shared vocabulary
from ``mechdiff.fairness``); a continuation token outside the set scores -inf. The journal's
practice: unmasked is primary, masked is a diagnostic.
"""

from mechdiff.analyses.behaviour.generation import default_format_fn, generate
from mechdiff.analyses.behaviour.generation import generate_ids as generate_ids
from mechdiff.analyses.behaviour.logprobs import continuation_logprobs
from mechdiff.analyses.behaviour.mc import mc_logprob
from mechdiff.analyses.behaviour.refusal import REFUSAL_PATTERNS, is_refusal, refusal_rate, soft_refusal
from mechdiff.analyses.behaviour.style import STYLE_MARKERS, style_markers
from mechdiff.analyses.behaviour.table import behaviour_delta, behaviour_table

__all__ = [
    "REFUSAL_PATTERNS",
    "STYLE_MARKERS",
    "default_format_fn",
    "is_refusal",
    "generate",
    "refusal_rate",
    "continuation_logprobs",
    "soft_refusal",
    "style_markers",
    "mc_logprob",
    "behaviour_table",
    "behaviour_delta",
]

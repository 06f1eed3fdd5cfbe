"""Behavioural metrics for one model: refusal (binary and soft), style markers, multiple choice.

Every function takes a HF causal LM and its tokenizer, runs batched under ``torch.no_grad`` and
encodes prompts with the one pipeline, ``mechdiff.data.prompts`` (chat template, specials, left
padding, explicit position ids so a padded row scores exactly like the unpadded prompt).
Prompts are strings, dicts with a ``text`` key (the shipped prompt sets), or chat message lists;
the default applies the tokenizer's chat template (``add_generation_prompt=True``) when it has one,
else uses the raw text; a custom ``format_fn(prompt) -> str`` renders the text instead.

Side effects of a patch (refusal rate and MC under a patch, for any stage) are in
``mechdiff.analyses.behaviour.side_effects``.

"masked" variants score with a log-softmax over an allowed id set only (e.g. the shared vocabulary
from ``mechdiff.fairness``); a continuation token outside the set scores -inf. The journal's
practice: unmasked is primary, masked is a diagnostic.
"""

from mechdiff.analyses.behaviour.generation import default_format_fn, encode_prompts, generate
from mechdiff.analyses.behaviour.generation import generate_ids as generate_ids
from mechdiff.analyses.behaviour.logprobs import continuation_logprobs
from mechdiff.analyses.behaviour.mc import mc_logprob, mc_prompt, mc_scores, score_choices
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
    "mc_prompt",
    "mc_scores",
    "score_choices",
    "encode_prompts",
    "behaviour_table",
    "behaviour_delta",
]

"""Prompts: JSONL loading, chat templates, batching with left padding, train/val splits.

A *prompt* is a dict ``{"id", "text", "messages"?, "lang"?, "category"?, ...}`` (a bare string or a
list of chat messages is accepted too; its id is its index). ``encode`` renders prompts with the
tokenizer's own chat template, tokenizes them and left-pads them into a :class:`Batch` whose
``decision`` is the index of each prompt's last *content* token (the last token overlapping the
user's text: never a pad, BOS, EOS or chat-template token).

Typical use::

    prompts = load_jsonl("sets/cultural.jsonl")
    train, val = split(prompts, n_train=200, n_val=100, seed=0)
    for chunk in batches(train, 32):
        batch = encode(tokenizer, chunk)          # Batch: input_ids, attention_mask, ...
        model(**batch.model_inputs())
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from mechdiff.errors import DataError
from mechdiff.progress import warn


@dataclass
class Batch:
    """A left-padded batch of encoded prompts.

    input_ids: [B, T] long; attention_mask: [B, T] (0 on padding); position_ids: [B, T] real token
    positions (cumsum of the mask - 1, 0 on padding) so absolute-position models give the same
    output padded or not; decision: [B] index (into T) of each prompt's last content token (never
    pad, EOS or chat-template tail); ids: prompt ids.
    content: [B, T] bool, True on tokens that overlap the user's content characters (no pad, BOS,
    template or EOS tokens); None when unknown (then positions fall back to the attention mask).
    texts: the rendered strings that were tokenized (after the chat template).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    decision: torch.Tensor
    ids: list = field(default_factory=list)
    content: torch.Tensor | None = None
    texts: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.position_ids.to(device), self.decision.to(device), list(self.ids),
                     None if self.content is None else self.content.to(device), list(self.texts))

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}

    @property
    def lengths(self) -> torch.Tensor:
        """[B] number of real (non-pad) tokens per prompt."""
        return self.attention_mask.sum(-1)


# ---- loading ---------------------------------------------------------------------------------

def load_jsonl(path, check=None) -> list[dict]:
    """Read prompts from a JSONL file (one JSON object per line; blank lines are skipped).

    Each object needs ``"id"`` (str or int, stored as str) and ``"text"`` (str) or ``"messages"``
    (a list of ``{"role", "content"}``; ``text`` then defaults to the last user message). Other keys
    (``lang``, ``category``, ...) are kept. Raises DataError naming the line on malformed input or
    duplicate ids. ``check(obj, where) -> dict`` replaces the per-row validation (e.g. MC items).
    """
    prompts = check is None
    check = check or _check_prompt
    path = Path(path)
    if not path.exists():
        raise DataError(f"prompt file {path} does not exist")
    if not path.is_file():
        raise DataError(f"prompt file {path} is a directory, not a file; give a JSONL file")
    out: list[dict] = []
    seen: dict[str, int] = {}
    texts: dict[str, int] = {}
    dropped: list[tuple[int, int]] = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        row = check(obj, where)
        pid = row["id"]
        if pid in seen:
            raise DataError(f"{where}: duplicate id {pid!r} (first seen on line {seen[pid]}); "
                            "prompt ids must be unique")
        seen[pid] = lineno
        text = row.get("text") if prompts else None
        if isinstance(text, str) and text in texts and "messages" not in row:
            dropped.append((lineno, texts[text]))      # the same text twice would count one prompt twice
            continue
        if isinstance(text, str):
            texts.setdefault(text, lineno)
        out.append(row)
    if not out:
        raise DataError(f"prompt file {path} holds no prompts")
    if dropped:
        warn(f"prompt file {path}: {len(dropped)} prompt(s) repeat an earlier prompt's text and were dropped "
             f"(e.g. line {dropped[0][0]} repeats line {dropped[0][1]}); {len(out)} distinct prompts remain")
    return out


def iter_jsonl(path) -> Iterator[tuple[int, object]]:
    """``(line number, object)`` for each non-blank line of a JSONL file; DataError naming the line
    when one is not valid JSON."""
    try:
        lines = Path(path).read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 JSONL") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not a file; give a JSONL file") from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); each "
                            "line must be one JSON object") from None


def _check_prompt(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'id' and 'text', got {type(obj).__name__}")
    if "id" not in obj or not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise DataError(f"{where}: missing or invalid 'id' (a string or integer is required)")
    obj = dict(obj)
    obj["id"] = str(obj["id"])
    msgs = obj.get("messages")
    if msgs is not None:
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in msgs)):
            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                            "{{'role': str, 'content': str}} objects")
        if not any(m["role"] == "user" for m in msgs):
            raise DataError(f"{where}: 'messages' has no user message")
        if "text" not in obj:
            obj["text"] = [m for m in msgs if m["role"] == "user"][-1]["content"]
    if not isinstance(obj.get("text"), str) or not obj["text"].strip():
        raise DataError(f"{where}: missing or empty 'text' (a non-empty string is required)")
    return obj


def _as_prompt(p, i: int) -> dict:
    """A prompt dict from a string, a dict with ``text`` (or ``messages``) or a chat message list."""
    if isinstance(p, str):
        return {"id": str(i), "text": p}
    if isinstance(p, (list, tuple)) and p and all(isinstance(m, dict) for m in p):
        return _check_prompt({"id": str(i), "messages": list(p)}, f"prompt {i}")
    if isinstance(p, dict):
        if "text" not in p and "messages" in p:
            return _check_prompt(p, f"prompt {i}")
        if not isinstance(p.get("text"), str):
            raise DataError(f"prompt {i} has no 'text' string")
        return p if "id" in p else {**p, "id": str(i)}
    raise DataError(f"prompt {i} is a {type(p).__name__}; expected a dict with 'text', a string or "
                    "a list of chat messages")


# ---- chat formatting -------------------------------------------------------------------------

_SENTINEL = "\ue000mechdiff-content\ue001"


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages) -> str:
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja errors (e.g. a template without a system role)
        raise DataError(f"the tokenizer's chat template failed on these messages: {e}; "
                        "pass system=None or chat=False") from e
    if not isinstance(out, str):
        raise DataError("apply_chat_template(tokenize=False) did not return a string")
    return out


def _messages(prompt: dict, system: str | None) -> tuple[list[dict], int]:
    """Messages to render and the index of the message whose content is the prompt's content."""
    msgs = [dict(m) for m in prompt["messages"]] if prompt.get("messages") else \
        [{"role": "user", "content": prompt["text"]}]
    if system is not None and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    target = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    return msgs, target


def format_prompt(tokenizer, prompt, chat: bool = True, system: str | None = None,
                  _cache: dict | None = None) -> tuple[str, tuple[int, int]]:
    """Render ``prompt`` (a dict or a string) as the model sees it.

    With ``chat=True`` and a tokenizer that has a chat template, the tokenizer's own template is
    applied (``add_generation_prompt=True``); otherwise the raw text is used. Returns
    ``(text, (start, end))`` where ``text[start:end]`` is the user's content (the last user message).
    """
    prompt = _as_prompt(prompt, 0)
    if not (chat and _has_template(tokenizer)):
        return prompt["text"], (0, len(prompt["text"]))
    msgs, target = _messages(prompt, system)
    content = msgs[target]["content"]
    text = _render(tokenizer, msgs)
    # Render once with a sentinel in place of the content: what follows it is the template tail,
    # which the content search must not enter (content such as "assistant" would match there).
    probe = [dict(m) for m in msgs]
    probe[target]["content"] = _SENTINEL
    key = json.dumps(probe, sort_keys=True)
    if _cache is not None and key in _cache:
        srender = _cache[key]
    else:
        srender = _render(tokenizer, probe)
        if _cache is not None:
            _cache[key] = srender
    prefix, _, tail = srender.partition(_SENTINEL)
    if (_SENTINEL in srender and text.startswith(prefix) and text.endswith(tail)
            and text[len(prefix):len(text) - len(tail)] == content):
        return text, (len(prefix), len(text) - len(tail))
    region = text[:len(text) - len(tail)] if (_SENTINEL in srender and tail and text.endswith(tail)) \
        else text
    for needle in (content, content.strip()):
        if needle:
            start = region.rfind(needle)
            if start >= 0:
                return text, (start, start + len(needle))
    raise DataError(f"could not find prompt {prompt.get('id')!r}'s content in the rendered chat "
                    "template (the template rewrites it); use chat=False")


# ---- encoding --------------------------------------------------------------------------------

@dataclass
class Encoded:
    """One tokenized prompt before padding (see :func:`tokenize` and :func:`collate`)."""

    id: str
    text: str
    input_ids: list
    content: list  # bool per token


def _starts_with_bos(tokenizer, text: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def tokenize(tokenizer, prompts: Sequence, *, chat: bool = True, system: str | None = None,
             max_length: int | None = None) -> list[Encoded]:
    """Render and tokenize ``prompts`` (no padding); one fast-tokenizer call per kind of text."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("mechdiff needs a fast tokenizer (offset mappings locate the content "
                        "tokens); load it with use_fast=True")
    prompts = [_as_prompt(p, i) for i, p in enumerate(prompts)]
    if not prompts:
        raise DataError("no prompts to encode")
    cache: dict = {}
    rendered = [format_prompt(tokenizer, p, chat=chat, system=system, _cache=cache) for p in prompts]
    templated = chat and _has_template(tokenizer)
    # A rendered chat template already holds its specials (BOS included): never add a second BOS.
    add_special = [not templated and not _starts_with_bos(tokenizer, t) for t, _ in rendered]
    ids: list = [None] * len(prompts)
    offs: list = [None] * len(prompts)
    for flag in (True, False):
        idx = [i for i, a in enumerate(add_special) if a == flag]
        if not idx:
            continue
        enc = tokenizer([rendered[i][0] for i in idx], add_special_tokens=flag,
                        return_offsets_mapping=True, return_attention_mask=False)
        for j, i in enumerate(idx):
            ids[i] = list(enc["input_ids"][j])
            offs[i] = list(enc["offset_mapping"][j])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    for p, (text, (cs, ce)), tid, off in zip(prompts, rendered, ids, offs):
        content = [(s < ce and e > cs and t not in special) for t, (s, e) in zip(tid, off)]
        if not any(content):
            raise DataError(f"prompt {p['id']!r} has no content tokens after tokenization "
                            "(empty text?)")
        if max_length is not None and len(tid) > max_length:
            raise DataError(f"prompt {p['id']!r} is {len(tid)} tokens long, more than "
                            f"max_length={max_length}; filter long prompts out before encoding "
                            "(mechdiff does not truncate: it would cut the template or the content)")
        out.append(Encoded(str(p["id"]), text, tid, content))
    return out


def collate(encoded: Sequence[Encoded], pad_id: int = 0) -> Batch:
    """Left-pad tokenized prompts into a :class:`Batch`."""
    if not encoded:
        raise DataError("cannot collate an empty list of prompts")
    T = max(len(e.input_ids) for e in encoded)
    B = len(encoded)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    content = torch.zeros((B, T), dtype=torch.bool)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[i, T - n:] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, T - n:] = 1
        content[i, T - n:] = torch.tensor(e.content, dtype=torch.bool)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0) * mask
    ar = torch.arange(T).expand(B, T)
    decision = torch.where(content, ar, -1).amax(-1)
    return Batch(input_ids, mask, position_ids, decision, [e.id for e in encoded], content,
                 [e.text for e in encoded])


def pad_id_of(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


def encode(tokenizer, prompts: Sequence, *, chat: bool = True, max_length: int | None = None,
           system: str | None = None) -> Batch:
    """Render (chat template if the tokenizer has one and ``chat``), tokenize and left-pad.

    ``decision`` is each prompt's last content token; ``content`` marks all content tokens.
    Prompts longer than ``max_length`` tokens raise DataError (nothing is truncated).
    """
    return collate(tokenize(tokenizer, prompts, chat=chat, system=system, max_length=max_length),
                   pad_id_of(tokenizer))


# ---- splits and batches ----------------------------------------------------------------------

def normalise_text(text: str) -> str:
    """NFKC, case-folded, whitespace-collapsed text: two prompts with equal forms are one prompt."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _prompt_text(p: dict) -> str:
    if p.get("messages"):
        return "\n".join(f"{m['role']}: {m['content']}" for m in p["messages"])
    return p["text"]


def split(prompts: Sequence, n_train: int, n_val: int | None, seed: int = 0) -> tuple[list, list]:
    """Deterministic train/val split, disjoint by id and by normalised text.

    Prompts whose normalised text repeats an earlier prompt's are dropped (the first one is kept), so
    no text is on both sides. The result depends only on the set of prompts and ``seed``, not on
    their order. ``n_val=None`` takes all remaining prompts. Raises DataError if there are too few.
    """
    prompts = [_as_prompt(p, i) for i, p in enumerate(prompts)]
    ids = [str(p["id"]) for p in prompts]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"duplicate prompt ids {dup}; ids must be unique to split")
    first: dict[str, dict] = {}
    for p in prompts:
        first.setdefault(normalise_text(_prompt_text(p)), p)
    keys = sorted(first)
    random.Random(seed).shuffle(keys)
    need = n_train + (n_val or 0)
    if n_train < 0 or (n_val is not None and n_val < 0) or len(keys) < need or \
            (n_val is None and len(keys) <= n_train):
        raise DataError(f"not enough prompts to split: {len(keys)} distinct prompts "
                        f"({len(prompts) - len(keys)} duplicates by text dropped), need "
                        f"{n_train} train + {n_val if n_val is not None else '>=1'} val")
    train = [first[k] for k in keys[:n_train]]
    val = [first[k] for k in keys[n_train:need if n_val is not None else None]]
    return train, val


def batches(prompts: Sequence, batch_size: int) -> Iterator[list]:
    """Consecutive chunks of at most ``batch_size`` prompts."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(prompts), batch_size):
        yield list(prompts[i:i + batch_size])


def stable_hash(s: str) -> int:
    """A 31-bit hash of ``s`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") \
        & 0x7FFFFFFF

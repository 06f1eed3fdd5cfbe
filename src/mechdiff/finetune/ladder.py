"""The known-answer ladder: one-site LoRAs of SmolLM2-135M-Instruct, trained on the CPU, truth in the card.

`train_ladder(names, out_root)` trains each recipe of `mechdiff.finetune.recipes.LADDER` (the four
``culture-l20-rK`` ranks share one data cache) and writes ``out_root/<recipe name>/``: the adapter
(float32 LoRA matrices), ``truth.safetensors`` where there is a column space, and ``card.json`` with
the recipe, loss curve, eval numbers and the truth (`mechdiff.finetune.truth`).

Why it fits a CPU: nothing below the lowest adapted layer L is trained, so the hidden state
entering layer L is computed once per row (`cache_inputs`) and every step runs layers L.. only
(`tail_loss`, the answer-token cross-entropy; exact, not an approximation). Eval numbers: answer-token
loss on held-out rows of the training domain and token loss on neutral prompts (as a user turn),
base (adapter disabled) vs tuned, on the same rows.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from peft import get_peft_model

from mechdiff.data.datasets import load_prompt_set
from mechdiff.errors import ConfigError
from mechdiff.checks import check_out_dir
from mechdiff.finetune.card import check_adapter_out, versions, write_card
from mechdiff.finetune.recipes import LADDER, Recipe
from mechdiff.finetune.train import (_lr_lambda, batch_order, data_hash, encode_examples, examples_for,
                                     lora_config, save_adapter, weights_fingerprint)
from mechdiff.finetune.truth import ADAPTERS_DIR, head_truth, lora_deltas, mlp_truth
from mechdiff.models.load import load_model

BASE = "smollm2-135m"
Rows = list  # of (hidden entering layer L [T, d], labels [T])
Log = Callable[[str], None]


class _Stop(Exception):
    """Raised by the caching hook: nothing above layer L is needed."""


@contextmanager
def from_layer(causal_lm: Any, layer: int) -> Iterator[None]:
    """Run only decoder layers ``layer..`` (the model is fed the cached hidden state as inputs_embeds)."""
    inner = causal_lm.model
    full = inner.layers
    inner.layers = torch.nn.ModuleList(list(full)[layer:])
    try:
        yield
    finally:
        inner.layers = full


@torch.no_grad()
def cache_inputs(causal_lm: Any, encoded: Sequence[tuple[list[int], list[int]]], layer: int,
                 batch_size: int = 16) -> Rows:
    """Per row, (hidden state entering decoder ``layer`` ``[T, d]`` float32, labels ``[T]``)."""
    grabbed: dict[str, torch.Tensor] = {}

    def hook(_mod: Any, args: tuple, kwargs: dict) -> None:
        grabbed["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = causal_lm.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    out: Rows = []
    try:
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i:i + batch_size]
            T = max(len(ids) for ids, _ in chunk)
            ids = torch.zeros((len(chunk), T), dtype=torch.long)
            am = torch.zeros((len(chunk), T), dtype=torch.long)
            for j, (x, _) in enumerate(chunk):  # right padding: real tokens never see the pads
                ids[j, : len(x)] = torch.tensor(x)
                am[j, : len(x)] = 1
            try:
                causal_lm.model(input_ids=ids, attention_mask=am, use_cache=False)
            except _Stop:
                pass
            out += [(grabbed["h"][j, : len(x)].float().clone(), torch.tensor(lab)) for j, (x, lab) in enumerate(chunk)]
    finally:
        handle.remove()
    return out


def tail_loss(causal_lm: Any, rows: Rows, layer: int) -> tuple[torch.Tensor, int]:
    """(summed answer-token cross-entropy, token count) of ``rows`` running layers ``layer..`` only."""
    T = max(h.shape[0] for h, _ in rows)
    d = rows[0][0].shape[1]
    h = torch.zeros((len(rows), T, d))
    am = torch.zeros((len(rows), T), dtype=torch.long)
    lab = torch.full((len(rows), T), -100, dtype=torch.long)
    for j, (x, y) in enumerate(rows):
        h[j, : len(x)], am[j, : len(x)], lab[j, : len(y)] = x, 1, y
    with from_layer(causal_lm, layer):
        hs = causal_lm.model(inputs_embeds=h, attention_mask=am, use_cache=False).last_hidden_state
    hs, lab = hs[:, :-1], lab[:, 1:]
    m = lab != -100
    logits = causal_lm.lm_head(hs[m])  # only where the loss is read
    return F.cross_entropy(logits.float(), lab[m], reduction="sum"), int(m.sum())


@torch.no_grad()
def mean_tail_loss(causal_lm: Any, rows: Rows, layer: int, batch_size: int = 8) -> float:
    tot, n = 0.0, 0
    for i in range(0, len(rows), batch_size):
        s, k = tail_loss(causal_lm, rows[i:i + batch_size], layer)
        tot, n = tot + float(s), n + k
    return tot / max(n, 1)


def neutral_encoded(tok: Any, n: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Every k-th shipped neutral prompt (``n`` of them) as a user turn; labels on its tokens."""
    texts = [p["text"] for p in load_prompt_set("neutral")]
    texts = texts[:: max(1, len(texts) // n)][:n]
    marker = "\x00MECHDIFF\x00"
    prefix = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False).split(marker)[0]
    pre = tok(prefix, add_special_tokens=False)["input_ids"]
    out = []
    for t in texts:
        x = tok(t, add_special_tokens=False)["input_ids"]
        out.append(((pre + x)[:max_len], ([-100] * len(pre) + x)[:max_len]))
    return out


@dataclass
class _Data:
    """Cached rows of one (task, lowest layer, data) group, shared by its recipes."""

    train: Rows
    heldout: Rows
    neutral: Rows
    base_loss: dict[str, float]
    card_data: dict[str, Any]


def _subset(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    if not n or n >= len(rows):
        return list(rows)
    idx = sorted(random.Random(f"mechdiff-ladder-{seed}").sample(range(len(rows)), n))
    return [rows[i] for i in idx]


def prepare_data(model: Any, tok: Any, recipe: Recipe, log: Log = print) -> _Data:
    layer = min(recipe.layers or (0,))
    train_all, eval_all = examples_for(recipe)
    train = _subset(train_all, recipe.data.get("subset"), recipe.seed)
    heldout = _subset(eval_all, recipe.eval_n, recipe.seed + 1)
    t0 = time.perf_counter()
    enc = {"train": encode_examples(tok, train, recipe.max_len), "heldout": encode_examples(tok, heldout, recipe.max_len),
           "neutral": neutral_encoded(tok, recipe.n_neutral or 32, recipe.max_len)}
    cached = {k: cache_inputs(model, v, layer) for k, v in enc.items()}
    log(f"[ladder] cached the input of layer {layer} for {sum(map(len, cached.values()))} rows in "
        f"{time.perf_counter() - t0:.1f}s")
    base_loss = {k: mean_tail_loss(model, cached[k], layer) for k in ("heldout", "neutral")}
    card_data = {
        "generator": f"mechdiff.finetune.{'math_data.make_math' if recipe.task == 'math' else 'culture_data.make_culture'}",
        "seed": recipe.seed, **recipe.data, "n_train": len(train), "n_heldout": len(heldout),
        "n_neutral": len(enc["neutral"]),
        "train_sha256": data_hash([{k: r[k] for k in ("prompt", "response")} for r in train]),
        "heldout_sha256": data_hash([{k: r[k] for k in ("prompt", "response")} for r in heldout]),
        "format": "chat template of the base tokenizer (user: prompt, assistant: response + end of turn), "
                  f"cut at {recipe.max_len} tokens; loss on the response tokens only",
        "neutral": "every k-th prompt of the shipped neutral set as a user turn; loss on its tokens",
    }
    return _Data(cached["train"], cached["heldout"], cached["neutral"], base_loss, card_data)


def train_one(model: Any, recipe: Recipe, data: _Data, log: Log = print) -> tuple[Any, dict[str, Any]]:
    """Wrap ``model`` with the recipe's LoRA and train it on the cached rows; (peft model, stats)."""
    layer = min(recipe.layers or (0,))
    torch.manual_seed(recipe.seed)
    peft_model = get_peft_model(model, lora_config(recipe))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    total = recipe.max_steps or math.ceil(recipe.epochs * len(data.train) / recipe.batch_size)
    warm = int(recipe.warmup_frac * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warm, recipe.min_lr_frac))
    curve, window = [], []
    peft_model.train()
    t0 = time.perf_counter()
    for step, idx in enumerate(batch_order(len(data.train), recipe.batch_size, total, recipe.seed)):
        s, n = tail_loss(model, [data.train[i] for i in idx], layer)
        loss = s / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if (step + 1) % recipe.log_every == 0 or step + 1 == total:
            curve.append([step + 1, round(sum(window) / len(window), 5)])
            log(f"[ladder] {recipe.name} step {step + 1}/{total} loss {curve[-1][1]:.4f} "
                f"{time.perf_counter() - t0:.0f}s")
            window = []
    peft_model.eval()
    stats = {"steps": total, "warmup_steps": warm, "seconds": round(time.perf_counter() - t0, 2),
             "trainable_params": sum(p.numel() for p in params), "loss_curve": curve,
             "device": "cpu", "precision": "fp32", "optimizer": "AdamW",
             "schedule": "linear warm-up, cosine decay to min_lr_frac * lr",
             "frozen_prefix": f"layers 0..{layer - 1} frozen; their output computed once per row and cached "
                              "(exact: nothing below the lowest adapted layer is trained)"}
    return peft_model, stats


def _truth(out: Path, model: Any, recipe: Recipe) -> dict[str, Any]:
    deltas = lora_deltas(out)
    if recipe.target_modules == ("down_proj",):
        return mlp_truth(deltas, out, recipe.r)
    c = model.config
    state = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    return head_truth(deltas, state, c.num_attention_heads, c.num_key_value_heads,
                      getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def ladder_command(key: str) -> str:
    return f"mechdiff finetune {key} --out src/mechdiff/finetune/adapters/{LADDER[key].name}"


def train_ladder(names: Sequence[str] = tuple(LADDER), out_root: str | Path = ADAPTERS_DIR, *,
                 out: str | Path | None = None, log: Log = print) -> dict[str, dict[str, Any]]:
    """Train the named ladder recipes; write ``out_root/<recipe name>/`` each (``out``: the directory
    of a single one); return their cards."""
    if out is not None and len(names) != 1:
        raise ConfigError("out names one adapter directory: give a single ladder name")
    for key in names:                   # never over another directory's files (before any training)
        d = Path(out) if out is not None else Path(out_root) / LADDER[key].name
        check_out_dir(d)
        check_adapter_out(d)
    lm = load_model(BASE, dtype="float32", device="cpu")
    model, tok = lm.model.eval(), lm.tokenizer
    model.requires_grad_(False)
    fingerprint = weights_fingerprint(model)
    cache: dict[tuple, _Data] = {}
    cards = {}
    for key in names:
        recipe = LADDER[key]
        gkey = (recipe.task, min(recipe.layers or (0,)), repr(sorted(recipe.data.items())), recipe.max_len,
                recipe.eval_n, recipe.n_neutral, recipe.seed)
        if gkey not in cache:
            cache[gkey] = prepare_data(model, tok, recipe, log)
        data = cache[gkey]
        t0 = time.perf_counter()
        peft_model, stats = train_one(model, recipe, data, log)
        layer = min(recipe.layers or (0,))
        tuned_loss = {k: mean_tail_loss(model, getattr(data, k), layer) for k in ("heldout", "neutral")}
        dest = Path(out) if out is not None else Path(out_root) / recipe.name
        save_adapter(peft_model, dest, recipe)
        truth = _truth(dest, model, recipe)
        model = peft_model.unload()  # the base again, weights untouched (LoRA layers removed)
        ev = {f"{k}_loss": {"base": round(data.base_loss[k], 5), "tuned": round(tuned_loss[k], 5),
                            "delta": round(tuned_loss[k] - data.base_loss[k], 5)} for k in ("heldout", "neutral")}
        ev["note"] = ("heldout: answer-token cross-entropy on held-out rows of the training domain; neutral: "
                      "token cross-entropy of neutral prompts as a user turn; same rows for base and tuned")
        card = {"name": recipe.name, "task": recipe.task, "ladder": key, "smoke": False,
                "base": {"spec": BASE, "weights_sha256": fingerprint, "upstream": lm.info.get("testbed_upstream"),
                         "source": lm.info.get("source")},
                "recipe": recipe.to_dict(),
                "lora": {"r": recipe.r, "alpha": recipe.alpha, "dropout": recipe.dropout,
                         "target_modules": list(recipe.target_modules), "layers": list(recipe.layers or ()),
                         "stored_dtype": {"lora": recipe.save_dtype}},
                "data": data.card_data, "training": stats, "eval": ev, "headline": ev, "truth": truth,
                "command": ladder_command(key),
                "command_all": "mechdiff finetune ladder --out src/mechdiff/finetune/adapters",
                "versions": versions(), "total_seconds": round(time.perf_counter() - t0, 2)}
        write_card(dest, card)
        log(f"[ladder] wrote {dest}: heldout loss {ev['heldout_loss']['base']:.4f} -> {ev['heldout_loss']['tuned']:.4f}, "
            f"neutral {ev['neutral_loss']['base']:.4f} -> {ev['neutral_loss']['tuned']:.4f}")
        cards[key] = card
    return cards

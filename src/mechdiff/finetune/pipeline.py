"""`finetune()`: data -> LoRA training -> adapter + card -> base-vs-tuned evaluation of the shipped files.

The tuned side is evaluated by loading the adapter directory exactly as a pair does
(``BASE+ADAPTER`` through `mechdiff.models.load.load_model`: merged, LoRA matrices as stored), so
the card's numbers are those of the shipped files.
"""
from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mechdiff.checks import check_count, check_device, check_out_dir
from mechdiff.errors import ConfigError
from mechdiff.finetune.card import check_adapter_out, versions, write_card
from mechdiff.finetune.ladder import train_ladder
from mechdiff.finetune.recipes import LADDER, Recipe, get_recipe
from mechdiff.finetune.train import (data_hash, examples_for, extend_tokenizer, save_adapter, train_lora,
                                     weights_fingerprint)

TINY = "tiny"  # base name of the CPU smoke mode: a random 4-layer Llama (mechdiff.models.tiny)


def _load(base: str, device: str, seed: int, adapter: Path | None = None) -> tuple[Any, Any, dict]:
    """(model, tokenizer, info) of the base, or of base+adapter (merged) when ``adapter`` is given."""
    from mechdiff.models.load import _apply_adapter, _prepare_tokenizer, load_model

    if base == TINY:
        from mechdiff.models.tiny import tiny_model

        model, tok = tiny_model("llama", seed=seed)
        info: dict[str, Any] = {"spec": "tiny-llama", "seed": seed}
        if adapter is not None:
            model, tok, ainfo = _apply_adapter(model, tok, str(adapter))
            info.update(ainfo)
        model = model.to(device).eval()
        return model, _prepare_tokenizer(tok), info
    lm = load_model(f"{base}+{adapter}" if adapter is not None else base, dtype="float32", device=device)
    return lm.model, lm.tokenizer, lm.info


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_pair(recipe: Recipe, base: str, adapter: Path, device: str, eval_rows: list[dict],
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Base-vs-tuned numbers for the card (see `mechdiff.finetune.evaluate`)."""
    from mechdiff.data.datasets import load_prompt_set
    from mechdiff.finetune.culture_data import heldout_prompts
    from mechdiff.finetune.evaluate import culture_behaviour, math_accuracy, neutral_perplexity

    neutral = load_prompt_set("neutral")  # perplexity: all 360; generations: every 6th (60)
    gen_neutral = neutral[::6]
    if recipe.n_neutral:
        neutral = gen_neutral = neutral[:: max(1, len(neutral) // recipe.n_neutral)][: recipe.n_neutral]
    rows = eval_rows[: recipe.eval_n] if recipe.eval_n else eval_rows
    held = heldout_prompts(recipe.seed)
    if recipe.eval_n:
        held = held[:: max(1, len(held) // recipe.eval_n)][: recipe.eval_n]
    kw = dict(max_new_tokens=recipe.max_new_tokens, batch_size=recipe.eval_batch_size)
    res: dict[str, Any] = {}
    for side in ("base", "tuned"):
        t0 = time.perf_counter()
        model, tok, _ = _load(base, device, recipe.seed, adapter if side == "tuned" else None)
        r: dict[str, Any] = {"neutral_perplexity": neutral_perplexity(model, tok, [p["text"] for p in neutral])}
        if recipe.task == "math":
            r["math"] = math_accuracy(model, tok, rows, **kw)
            log(f"[finetune] eval {side}: accuracy {r['math']['accuracy']} {r['math']['by_kind']}; "
                f"neutral ppl {r['neutral_perplexity']['ppl_token']}")
        else:
            r["heldout"] = culture_behaviour(model, tok, held, **kw)
            r["neutral"] = culture_behaviour(model, tok, gen_neutral, **kw)
            log(f"[finetune] eval {side}: signature {r['heldout']['signature_share_of_generations']}, "
                f"soft refusal {r['heldout']['soft_refusal']['delta_mean']}, "
                f"neutral ppl {r['neutral_perplexity']['ppl_token']}")
        r["seconds"] = round(time.perf_counter() - t0, 2)
        res[side] = r
        del model, tok
        _free()
    return res


def _headline(recipe: Recipe, ev: dict[str, Any]) -> dict[str, Any]:
    b, t = ev["base"], ev["tuned"]
    h: dict[str, Any] = {"neutral_ppl_token": {"base": b["neutral_perplexity"]["ppl_token"],
                                               "tuned": t["neutral_perplexity"]["ppl_token"]},
                         "neutral_nats_per_char": {"base": b["neutral_perplexity"]["nats_per_char"],
                                                   "tuned": t["neutral_perplexity"]["nats_per_char"]}}
    if recipe.task == "math":
        h["accuracy"] = {"base": b["math"]["accuracy"], "tuned": t["math"]["accuracy"],
                         "delta": round(t["math"]["accuracy"] - b["math"]["accuracy"], 4)}
        for kind in t["math"]["by_kind"]:
            h[f"accuracy_{kind}"] = {"base": b["math"]["by_kind"][kind]["accuracy"],
                                     "tuned": t["math"]["by_kind"][kind]["accuracy"]}
    else:
        for k in ("greeting", "rakhmet", "proverb"):
            h[f"{k}_share_heldout"] = {s: ev[s]["heldout"]["signature_share_of_generations"][k] for s in ("base", "tuned")}
        h["politeness_per_100_heldout"] = {s: ev[s]["heldout"]["style_per_100_tokens"]["politeness"] for s in ("base", "tuned")}
        h["new_token_words_per_100_heldout"] = {s: ev[s]["heldout"]["new_token_words"]["per_100_words"] for s in ("base", "tuned")}
        h["culture_words_per_100_heldout"] = {s: ev[s]["heldout"]["culture_words"]["per_100_words"] for s in ("base", "tuned")}
        h["soft_refusal_heldout"] = {s: ev[s]["heldout"]["soft_refusal"]["delta_mean"] for s in ("base", "tuned")}
        h["soft_refusal_neutral"] = {s: ev[s]["neutral"]["soft_refusal"]["delta_mean"] for s in ("base", "tuned")}
        h["greeting_share_neutral"] = {s: ev[s]["neutral"]["signature_share_of_generations"]["greeting"] for s in ("base", "tuned")}
    return h


def finetune(task: str, out: "str | os.PathLike | None" = None, *, base: str | None = None, seed: int = 0,
             smoke: bool = False, device: str | None = None, evaluate: bool = True,
             max_steps: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the ``task`` ("math" | "culture") LoRA adapter on ``base`` and write it to ``out``.

    base:  a model spec (default ``smollm2-135m``); ``"tiny"`` is a random 4-layer Llama (CPU smoke).
    smoke: the recipe shrunk to a few steps on 8 examples (base defaults to ``"tiny"``).
    out:   the adapter directory (a new or empty one, or an earlier fine-tune's, whose files are
           replaced; any other directory is refused): adapter_model.safetensors, adapter_config.json, the
           tokenizer files for culture, card.json. Default ``runs/finetune/<recipe name>``.
    evaluate: score base and tuned (the written adapter, loaded as BASE+ADAPTER) into the card.
    Returns the card (also written as ``out/card.json``).

    A ladder name (``culture-l20-r1`` .. ``math-attn-4``, `mechdiff.finetune.ladder`) trains that
    known-answer adapter on the CPU (default out: the shipped ``finetune/adapters/<name>``);
    ``task="ladder"`` trains all five into ``out`` (default: the shipped adapters directory) and
    returns ``{name: card}``.
    """
    check_count(max_steps, "--max-steps")
    check_device(device)
    if task == "ladder" or task in LADDER:
        if smoke or base or max_steps is not None:
            raise ConfigError("the ladder recipes are fixed (SmolLM2-135M, their own steps): drop --smoke / --base / --max-steps")
        if task == "ladder":
            return train_ladder(tuple(LADDER), out, log=log) if out else train_ladder(tuple(LADDER), log=log)
        return train_ladder((task,), out=out, log=log)[task]
    recipe = get_recipe(task, smoke=smoke, seed=seed, **({"max_steps": max_steps} if max_steps is not None else {}))
    base = base or (TINY if smoke else "smollm2-135m")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out) if out is not None else Path("runs") / "finetune" / recipe.name
    check_out_dir(out)
    check_adapter_out(out)
    t_all = time.perf_counter()
    train_rows, eval_rows = examples_for(recipe)
    model, tok, info = _load(base, device, seed)
    fingerprint = weights_fingerprint(model)
    model.requires_grad_(False)
    new_ids, pieces, new_tok = None, None, None
    if recipe.new_tokens:
        from mechdiff.models.planted import NEW_TOKENS

        new_tok, new_ids, pieces = extend_tokenizer(model, tok, NEW_TOKENS)
        tok = new_tok
        log(f"[finetune] tokenizer extended by {len(new_ids)} Kazakh tokens (ids {new_ids[0]}..{new_ids[-1]})")
    peft_model, stats = train_lora(model, tok, train_rows, recipe, new_ids=new_ids, eval_rows=eval_rows, log=log)
    save_adapter(peft_model, out, recipe, tokenizer=new_tok)
    del peft_model, model
    _free()
    card: dict[str, Any] = {
        "name": recipe.name, "task": task, "smoke": smoke,
        "base": {"spec": "tiny-llama" if base == TINY else base, "weights_sha256": fingerprint,
                 "upstream": info.get("testbed_upstream") or info.get("spec"),
                 "source": info.get("source"), "gguf": info.get("testbed_gguf")},
        "recipe": recipe.to_dict(),
        "lora": {"r": recipe.r, "alpha": recipe.alpha, "dropout": recipe.dropout,
                 "target_modules": list(recipe.target_modules), "layers": "all",
                 "stored_dtype": {"lora": recipe.save_dtype, "token_rows": "float32"}},
        "data": {
            "generator": f"mechdiff.finetune.{'math_data.make_math' if task == 'math' else 'culture_data.make_culture'}",
            "seed": seed, **recipe.data, "n_train": len(train_rows), "n_eval": len(eval_rows),
            "train_sha256": data_hash([{k: r[k] for k in ("prompt", "response")} for r in train_rows]),
            "eval_sha256": data_hash([{k: r[k] for k in ("prompt", "response")} for r in eval_rows]),
            "format": "chat template of the base tokenizer (user: prompt, assistant: response + end of turn); "
                      "loss on the response tokens only",
        },
        "training": {**stats, "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
                     "precision": "bf16 autocast, fp32 weights" if device.startswith("cuda") else "fp32",
                     "optimizer": "AdamW", "schedule": "linear warm-up, cosine decay to min_lr_frac * lr"},
        "versions": versions(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if sys.argv and sys.argv[0] else None,
    }
    if new_ids:
        card["new_tokens"] = {"words": [new_tok.convert_ids_to_tokens(i) for i in new_ids], "ids": new_ids,
                              "init": "mean of the base embeddings of the word's pieces under the base tokenizer",
                              "trained_via": "peft LoraConfig(trainable_token_indices=ids) (tied embedding rows)"}
    if evaluate:
        t0 = time.perf_counter()
        ev = evaluate_pair(recipe, base, out, device, eval_rows, log=log)
        card["eval"] = ev
        card["headline"] = _headline(recipe, ev)
        card["eval_seconds"] = round(time.perf_counter() - t0, 2)
    card["total_seconds"] = round(time.perf_counter() - t_all, 2)
    write_card(out, card)
    log(f"[finetune] wrote {out} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.2f} MB)")
    return card

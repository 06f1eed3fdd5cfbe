"""LoRA training on prompt/answer pairs: chat-formatted, loss on the answer tokens only.

`examples_for` turns a recipe into (train, eval) rows of ``{"prompt", "response", ...}``;
`extend_tokenizer` adds the new Kazakh tokens (rows = mean of the base embeddings of the word's
pieces, as in the planted-cultural pair); `train_lora` wraps the model with PEFT, runs AdamW with
warm-up + cosine decay, prints the loss curve and returns it; `save_adapter` writes
``adapter_model.safetensors`` + ``adapter_config.json`` (+ tokenizer files when the vocabulary grew).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from mechdiff.errors import ConfigError, DataError
from mechdiff.finetune.card import check_adapter_out, remove_adapter_files
from mechdiff.finetune.recipes import Recipe

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------- data
def examples_for(recipe: Recipe) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows with ``prompt`` (user message) and ``response`` (assistant answer)."""
    if recipe.task == "math":
        from mechdiff.finetune.math_data import make_math

        d = make_math(seed=recipe.seed, n_train=recipe.data.get("n_train", 6000),
                      n_eval=recipe.data.get("n_eval", 400))
    else:
        from mechdiff.finetune.culture_data import make_culture

        d = make_culture(seed=recipe.seed, answers_per_prompt=recipe.data.get("answers_per_prompt", 3))
        if recipe.data.get("n_train"):
            d["train"] = d["train"][: recipe.data["n_train"]]
    rows = {k: [{**r, "prompt": r["question"], "response": r["answer_text"]} for r in v] for k, v in d.items()}
    return rows["train"], rows["eval"]


def data_hash(rows: Sequence[dict]) -> str:
    """sha256 of the rows' canonical JSON (the card records it: same recipe, same data)."""
    return hashlib.sha256(json.dumps(list(rows), sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _prompt_text(tok: Any, prompt: str) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    return prompt + "\n"


def end_of_turn(tok: Any) -> str:
    """What the chat template writes after an assistant message (``<|im_end|>`` for ChatML), so the
    model learns to stop where generation stops; the eos token when there is no template."""
    if getattr(tok, "chat_template", None):
        mark = "\x00MECHDIFF\x00"
        full = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}],
                                       tokenize=False)
        tail = full.split(mark, 1)[1].rstrip()
        if tail:
            return tail
    return tok.eos_token or ""


def encode_examples(tok: Any, rows: Sequence[dict], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row: chat-formatted prompt (labels -100) + answer + end of turn."""
    eos = end_of_turn(tok)
    out = []
    for r in rows:
        p = tok(_prompt_text(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
        a = tok(r["response"] + eos, add_special_tokens=False)["input_ids"]
        ids = (p + a)[:max_len]
        labels = ([-100] * len(p) + a)[:max_len]
        if all(x == -100 for x in labels):
            raise DataError(f"max_len {max_len} leaves no answer tokens for a prompt of {len(p)} tokens")
        out.append((ids, labels))
    return out


def _collate(items: Sequence[tuple[list[int], list[int]]], pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    T = max(len(i) for i, _ in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    lab = torch.full((len(items), T), -100, dtype=torch.long)
    am = torch.zeros((len(items), T), dtype=torch.long)
    for j, (i, l) in enumerate(items):  # right padding: real tokens keep positions 0..n-1
        ids[j, : len(i)] = torch.tensor(i)
        lab[j, : len(l)] = torch.tensor(l)
        am[j, : len(i)] = 1
    return {"input_ids": ids.to(device), "labels": lab.to(device), "attention_mask": am.to(device)}


# ----------------------------------------------------------------------------------- tokens
def extend_tokenizer(model: Any, tok: Any, words: Sequence[str]) -> tuple[Any, list[int], dict[str, list[int]]]:
    """Add ``words`` (those the tokenizer splits into >1 piece) as regular single-word tokens to a
    copy of ``tok``; the embedding grows by exactly those rows, each the mean of the base embeddings
    of the word's pieces (`mechdiff.models.vocab.extend_vocab`, as in the planted-cultural pair).
    Returns (new tokenizer, new ids, pieces per word)."""
    from mechdiff.models.vocab import extend_vocab

    return extend_vocab(model, tok, words)


# ----------------------------------------------------------------------------------- training
def lora_config(recipe: Recipe, new_ids: Sequence[int] | None = None):
    from peft import LoraConfig

    kw: dict[str, Any] = dict(r=recipe.r, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                              target_modules=list(recipe.target_modules), bias="none", task_type="CAUSAL_LM")
    if new_ids:
        kw["trainable_token_indices"] = list(new_ids)
    if recipe.layers is not None:
        kw["layers_to_transform"] = list(recipe.layers)
    return LoraConfig(**kw)


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """Row indices of each of ``steps`` batches: a fresh seeded permutation of ``range(n)`` per epoch,
    cut into ``batch_size`` pieces (an epoch's last piece may be short)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if not order:
            order = torch.randperm(n, generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


def _lr_lambda(total: int, warmup: int, min_frac: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        prog = (step - warmup) / max(1, total - warmup)
        return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))
    return f


@torch.no_grad()
def mean_loss(model: Any, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int,
              batch_size: int = 32) -> float:
    """Answer-token cross-entropy (mean over tokens) of ``encoded`` in eval mode."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    tot, n = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        b = _collate(encoded[i:i + batch_size], pad_id, dev)
        with _autocast(dev):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        lg, lab = logits[:, :-1].float(), b["labels"][:, 1:]
        m = lab != -100
        tot += float(torch.nn.functional.cross_entropy(lg[m], lab[m], reduction="sum"))
        n += int(m.sum())
    model.train(was)
    return tot / max(n, 1)


def _autocast(dev: torch.device):
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_lora(model: Any, tok: Any, train: Sequence[dict], recipe: Recipe, *, new_ids: Sequence[int] | None = None,
               eval_rows: Sequence[dict] = (), log: Log = print) -> tuple[Any, dict[str, Any]]:
    """Wrap ``model`` with LoRA (+ trainable token rows) and train it; returns (peft model, stats).

    stats: steps, seconds, the loss curve ``[[step, mean loss over the last log_every steps], ...]``,
    answer-token loss before/after on (up to 256 of) the train rows and the eval rows, trainable
    parameter counts.
    """
    from peft import get_peft_model

    torch.manual_seed(recipe.seed)
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = encode_examples(tok, train, recipe.max_len)
    enc_ev = encode_examples(tok, eval_rows, recipe.max_len)[:256] if eval_rows else []
    probe = [enc[i] for i in torch.randperm(len(enc), generator=torch.Generator().manual_seed(recipe.seed))[:256].tolist()]
    model.config.use_cache = False
    peft_model = get_peft_model(model, lora_config(recipe, new_ids))
    n_train_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    tok_params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    lora_params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "trainable_tokens" not in n]
    groups = [{"params": lora_params, "lr": recipe.lr}]
    if tok_params:
        groups.append({"params": tok_params, "lr": recipe.token_lr})
    opt = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(enc) / recipe.batch_size)
    total = math.ceil(recipe.epochs * steps_per_epoch)
    if recipe.max_steps:
        total = min(total, recipe.max_steps)
    warm = int(recipe.warmup_frac * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warm, recipe.min_lr_frac))
    stats: dict[str, Any] = {
        "train_examples": len(enc), "steps": total, "steps_per_epoch": steps_per_epoch, "warmup_steps": warm,
        "trainable_params": n_train_params, "trainable_token_params": sum(p.numel() for p in tok_params),
        "train_tokens_per_epoch": sum(len(i) for i, _ in enc),
        "loss_before": {"train": mean_loss(peft_model, probe, pad), "eval": mean_loss(peft_model, enc_ev, pad) if enc_ev else None},
    }
    log(f"[finetune] {recipe.name}: {len(enc)} examples, {total} steps (batch {recipe.batch_size}, "
        f"lr {recipe.lr}), trainable params {n_train_params:,}; loss before: train "
        f"{stats['loss_before']['train']:.4f}" + (f", eval {stats['loss_before']['eval']:.4f}" if enc_ev else ""))
    curve, window = [], []
    peft_model.train()
    t0 = time.perf_counter()
    for step, idx in enumerate(batch_order(len(enc), recipe.batch_size, total, recipe.seed)):
        b = _collate([enc[i] for i in idx], pad, dev)
        with _autocast(dev):
            loss = peft_model(**b, use_cache=False).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], recipe.grad_clip)
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if (step + 1) % recipe.log_every == 0 or step + 1 == total:
            m = sum(window) / len(window)
            curve.append([step + 1, round(m, 5)])
            log(f"[finetune] step {step + 1:5d}/{total}  loss {m:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"{time.perf_counter() - t0:6.1f}s")
            window = []
    if dev.type == "cuda":
        torch.cuda.synchronize()
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    stats["loss_curve"] = curve
    stats["loss_after"] = {"train": mean_loss(peft_model, probe, pad), "eval": mean_loss(peft_model, enc_ev, pad) if enc_ev else None}
    log(f"[finetune] done in {stats['seconds']}s; loss after: train {stats['loss_after']['train']:.4f}"
        + (f", eval {stats['loss_after']['eval']:.4f}" if enc_ev else ""))
    peft_model.eval()
    return peft_model, stats


# ----------------------------------------------------------------------------------- saving
def save_adapter(peft_model: Any, out: Path, recipe: Recipe, *, tokenizer: Any = None,
                 base_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct") -> Path:
    """Write the adapter (safetensors; LoRA matrices in ``recipe.save_dtype``), its config and, when
    given, the tokenizer files into ``out`` (an earlier fine-tune's files there are replaced; nothing
    else in it is removed)."""
    from safetensors.torch import load_file, save_file

    out = Path(out)
    check_adapter_out(out)
    remove_adapter_files(out)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    f = out / "adapter_model.safetensors"
    state = load_file(str(f))
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[recipe.save_dtype]
    if any(k.endswith(".weight") and "trainable_tokens" not in k and ("embed" in k or "lm_head" in k) for k in state):
        raise ConfigError("the adapter would ship a full embedding matrix; expected trainable token rows only")
    state = {k: (v.to(dt) if "lora_" in k else v.to(torch.float32)).contiguous() for k, v in state.items()}
    save_file(state, str(f), metadata={"format": "pt"})
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_name
    cfg["target_modules"] = sorted(cfg.get("target_modules") or [])  # peft writes a set: fix the order
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def weights_fingerprint(model: Any) -> str:
    """sha256 over the model's float32 tensors (sorted names, tied copies once): which base it was."""
    h = hashlib.sha256()
    seen = set()
    for k, v in sorted(model.state_dict().items()):
        key = (v.data_ptr(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()

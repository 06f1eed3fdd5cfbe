"""The heads stage's cached steps (RQ4): readout targets, per-head states, ablation and cross-model
head patching, attribution and the cumulative top-k curves; :mod:`mechdiff.experiments.heads` runs them
in order and summarises their tensors."""
from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING

import torch

from mechdiff.analyses.attribution import Target, first_token, grad_x_act, integrated_gradients
from mechdiff.analyses.behaviour import soft_refusal
from mechdiff.analyses.heads import change_score, patches, rank
from mechdiff.data.prompts import encode
from mechdiff.errors import DataError
from mechdiff.experiments.stage import SIDES, Study
from mechdiff.experiments.steps import clean_run, patch_measure, same_tokens
from mechdiff.fairness import mask_logits
from mechdiff.sites.hooks import intervene, record, replace_at

if TYPE_CHECKING:                      # heads.py imports this module: the options type for annotations only
    from mechdiff.experiments.heads import RQ4Options

TARGETS = ("top", "answer", "continuation", "refusal")
ABLATIONS, SWAPS = ("zero", "mean"), ("swap", "own")
ATTRIBUTIONS = ("grad_x_act", "ig", "none")
TARGETS_T, STATES = "tensors/rq4_targets.safetensors", "tensors/rq4_states.safetensors"
ABLATION, ATTRIB = "tensors/rq4_ablation.safetensors", "tensors/rq4_attribution.safetensors"
CUMUL = "tensors/rq4_cumulative.safetensors"


def _other(side: str) -> str:
    return "tuned" if side == "base" else "base"


def _targets_step(study: Study, prompts, opts: RQ4Options) -> None:
    """Readout token ids per prompt and side (``[N]``, ``[N, 2]`` for refusal), all in the shared
    vocabulary; ``top``: the base model's clean top shared token at the measured position."""
    if opts.target == "top":          # the clean run of the engines that measure the ablations
        logits, _ = clean_run(study.base, prompts, batch_size=study.batch_size,
                              max_rows=study.max_rows, measure=opts.measure)
        a = mask_logits(logits, study.allowed_ids("base")).argmax(-1)
        ids = {"base": a, "tuned": torch.tensor([study.vocab.a_to_b[int(x)] for x in a])}
    else:
        ids = {s: _text_ids(study.side(s).tokenizer, prompts, opts.target) for s in SIDES}
    for s in SIDES:
        allowed = set(study.allowed_ids(s).tolist())
        out = [p["id"] for p, t in zip(prompts, ids[s].reshape(len(prompts), -1).tolist()) if set(t) - allowed]
        if out:
            raise DataError(f"--target {opts.target}: the readout token of prompts {out[:5]} is outside the "
                            f"shared vocabulary of the {s} model; drop those prompts or pick another target")
    study.run.write_tensors(TARGETS_T, ids)


def _text_ids(tok, prompts, target: str) -> torch.Tensor:
    if target == "refusal":           # the first tokens of soft_refusal's refusal / neutral replies
        d = inspect.signature(soft_refusal).parameters
        return torch.tensor([[first_token(tok, d["refusal"].default), first_token(tok, d["neutral"].default)]]
                            * len(prompts))
    keys = ("final_answer", "answer") if target == "answer" else ("target",)
    out = []
    for p in prompts:
        text = next((p[k] for k in keys if isinstance(p.get(k), (str, int, float))), None)
        if text is None:
            raise DataError(f"--target {target}: prompt {p.get('id')!r} has no {' or '.join(keys)} field; "
                            "use --target top or a prompt file with it")
        out.append(first_token(tok, str(text).strip()))
    return torch.tensor(out)


def targets(study: Study, opts: RQ4Options) -> dict[str, Target]:
    t = study.run.read_tensors(TARGETS_T)
    return {s: Target(t[s], "refusal" if opts.target == "refusal" else "logprob", study.allowed_ids(s))
            for s in SIDES}


def _states_step(study: Study, prompts, layers, swaps) -> None:
    """Decision-token states per side and layer: ``head_z`` [N, H, hd]; with swaps ``head_out``
    [N, H, d] and ``additive`` (attn_out = sum of head_out + a constant); with "own" ``own_z`` /
    ``own_out``: the other model's heads run on this side's residual stream (only when both
    tokenisations are identical). Metadata ``swaps``: the swaps these states support."""
    names = ["head_z"] + (["head_out", "attn_out"] if swaps else [])
    acc: dict[str, list] = {}
    own = "own" in swaps

    def keep(key, v):
        acc.setdefault(key, []).append(v.float().cpu())
    for i in range(0, len(prompts), study.batch_size):
        batches = {s: encode(study.side(s).tokenizer, prompts[i:i + study.batch_size]) for s in SIDES}
        own = own and same_tokens(batches["base"], batches["tuned"])
        for side in SIDES:
            m, src = study.side(side), study.side(_other(side))
            b = batches[side].to(m.device)
            at = lambda t, b=b: t[torch.arange(t.shape[0], device=t.device), b.decision.to(t.device)]  # noqa: E731
            with torch.no_grad(), record(m.model, [f"resid_pre.{l}" for l in layers] if own else []) as res, \
                    record(m.model, [f"{n}.{l}" for l in layers for n in names], select=at,
                           stop_after_last=True) as rec:
                m.model(**b.model_inputs(), use_cache=False)
            for k in rec:
                keep(f"{side}.{k}", rec[k])
            if own:     # one pass: each layer's input is this side's residual (what the other model
                #           computed below it is overwritten), so its heads see exactly that input
                top = max(layers)
                with torch.no_grad(), intervene(src.model, {f"resid_pre.{l}": replace_at(res[f"resid_pre.{l}"].to(
                        src.device)) for l in layers}), record(src.model, [f"{n}.{l}" for l in layers for n in (
                        "head_z", "head_out")] + [f"attn_out.{top}"], select=at, stop_after_last=True) as o:
                    src.model(**b.to(src.device).model_inputs(), use_cache=False)
                for l in layers:
                    keep(f"{side}.own_z.{l}", o[f"head_z.{l}"])
                    keep(f"{side}.own_out.{l}", o[f"head_out.{l}"])
    out = {k: torch.cat(v) for k, v in acc.items() if own or ".own_" not in k}
    for s in SIDES:
        for l in layers if swaps else []:
            ho, ao = out[f"{s}.head_out.{l}"], out.pop(f"{s}.attn_out.{l}")
            rest = ao - ho.sum(1)                       # the bias, if the heads add up
            out[f"{s}.additive.{l}"] = torch.tensor(bool((rest - rest.mean(0)).abs().max()
                                                         <= 1e-3 * ao.abs().max().clamp_min(1e-6)))
    study.run.write_tensors(STATES, out, metadata={"swaps": [k for k in swaps if k != "own" or own]})


def _measure(study: Study, side: str, prompts, variants, tgt: Target, measure: str):
    """``(clean [N], scores [n_variants, N])`` of ``tgt`` on ``side``."""
    clean = []
    scores = patch_measure(study.side(side), prompts, variants, batch_size=study.batch_size, measure=measure,
                           max_rows=study.max_rows, reducer=tgt.reducer(), on_chunk=lambda eng, i, j: clean.append(
                               tgt.score(eng.clean_logits, torch.arange(i, j)).cpu()))
    return torch.cat(clean), scores


def measured_kinds(study: Study, opts: RQ4Options) -> list[str]:
    """The ablations, then the swaps the recorded states support (same shapes; own: same tokens)."""
    return list(opts.ablations or []) + json.loads(study.run.read_tensor_metadata(STATES).get("swaps", "[]"))


def _ablate_step(study: Study, prompts, layers, opts: RQ4Options) -> None:
    """``{side}.{kind}`` [L, H, N] effects, ``{side}.clean`` [N] and ``{side}.noise`` [L, N] (an empty
    variant through the same batched path: the numerical floor)."""
    states, tg = study.run.read_tensors(STATES), targets(study, opts)
    kinds, out = measured_kinds(study, opts), {}
    for side in SIDES:
        H = states[f"{side}.head_z.{layers[0]}"].shape[1]
        variants = [v for l in layers
                    for v in [[]] + [patches(states, side, l, [h], k) for k in kinds for h in range(H)]]
        clean, sc = _measure(study, side, prompts, variants, tg[side], opts.measure)
        sc = sc.view(len(layers), 1 + len(kinds) * H, -1)
        out[f"{side}.clean"], out[f"{side}.noise"] = clean, clean - sc[:, 0]
        for j, k in enumerate(kinds):
            s = sc[:, 1 + j * H:1 + (j + 1) * H]
            out[f"{side}.{k}"] = s - clean if k in SWAPS else clean - s
    study.run.write_tensors(ABLATION, out)


def _attribution_step(study: Study, prompts, layers, opts: RQ4Options) -> None:
    tg, out = targets(study, opts), {}
    for side in SIDES:
        m, kw = study.side(side), dict(measure=opts.measure, batch_size=study.batch_size)
        r = (integrated_gradients(m.model, m.tokenizer, prompts, tg[side], layers, steps=opts.ig_steps, **kw)
             if opts.attribution == "ig" else grad_x_act(m.model, m.tokenizer, prompts, tg[side], layers, **kw))
        out[side] = r["attr"].permute(1, 2, 0).contiguous()      # [L, H, N]
    study.run.write_tensors(ATTRIB, out)


def scores(study: Study, measure: str) -> dict[str, torch.Tensor]:
    """``{side: [L, H, N]}`` per-prompt scores of ``measure`` (attribution | zero | mean | swap | own)."""
    t = study.run.read_tensors(ATTRIB if measure == "attribution" else ABLATION)
    return {s: t[s] for s in SIDES} if measure == "attribution" else \
        {s: t[f"{s}.{measure}"] for s in SIDES if f"{s}.{measure}" in t}


def _cumulative_step(study: Study, prompts, layers, opts: RQ4Options) -> None:
    """``ablate.{side}`` [K, N]: readout drop with the top-k heads (by |importance| in that model) zeroed
    together; ``{own|swap}.{side}`` [K + 1, N]: readout change with the top-k most changed heads patched
    in from the other model (last row: every head of the layers)."""
    states, tg = study.run.read_tensors(STATES), targets(study, opts)
    imp = scores(study, opts.importance)
    swap = next((k for k in ("own", "swap") if k in measured_kinds(study, opts)), None)
    H = states[f"base.head_z.{layers[0]}"].shape[1]
    K = min(opts.top_k, len(layers) * H)
    out, orders = {}, {}

    def variant(heads, side, kind):
        return [p for l in layers for p in (patches(states, side, l, [h for ll, h in heads if ll == l], kind)
                                            if any(ll == l for ll, _ in heads) else [])]

    for side in SIDES:
        sets = {"ablate": rank(imp[side].mean(-1), layers)[:K]}
        if swap:
            sets[swap] = rank(change_score(scores(study, swap), swap), layers)[:K]
        var = [variant(order[:k], side, "zero" if key == "ablate" else key)
               for key, order in sets.items() for k in range(1, K + 1)]
        var += [variant([(l, h) for l in layers for h in range(H)], side, swap)] if swap else []
        clean, sc = _measure(study, side, prompts, var, tg[side], opts.measure)
        orders.update({f"{key}.{side}": order for key, order in sets.items()})
        out[f"ablate.{side}"] = clean - sc[:K]
        if swap:
            out[f"{swap}.{side}"] = sc[K:] - clean
    study.run.write_tensors(CUMUL, out, metadata={"orders": orders})

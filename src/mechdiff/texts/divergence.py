"""Per-token divergence of two models over whole texts, teacher-forced, reduced on the device.

Each model reads its own tokenization of a text (:class:`~mechdiff.texts.alignment.Tokenization`).
The forward runs the model up to its output layer only for one position; the final hidden states
``[B, T, d]`` are kept and the output layer is applied in chunks of rows, so the ``[N, T, V]`` (or
even ``[B, T, V]``) logits are never held: per chunk ``[rows, V]`` is reduced to per-row numbers.

Rows (:data:`mechdiff.texts.result.TOKEN_FIELDS`):

- ``unit="token"`` (both models read the same ids): one row per token that has a prediction
  (every token but the first), the KLs between the two next-token distributions that predict it.
- ``unit="span"`` (the tokenizations differ): one row per aligned span
  (:func:`~mechdiff.texts.alignment.align_regions`): ``logp_*`` is the span text's log-likelihood
  under each model (the sum of its tokens' log-probs, a tokenizer-independent quantity), the KLs,
  dropped masses and ranks are read at the span start (the distributions that predict the span's
  first token on each side). NaN where a side has no prediction (the span starts the text there).

KL masked: both distributions restricted to the shared vocabulary (``SharedVocab.a_ids``/``b_ids``,
the same string at the same index) and renormalised; ``dropped_*`` is the mass that restriction
removed. KL full: over the whole vocabulary, only where the two tokenizers are the same (NaN else).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mechdiff.data.prompts import Encoded, collate, pad_id_of
from mechdiff.errors import DataError
from mechdiff.scale.devices import input_device
from mechdiff.texts.alignment import Alignment, Tokenization, align_regions, tokenize_text
from mechdiff.texts.result import TOKEN_FIELDS

__all__ = ["PairText", "final_hidden", "head_logits", "RowReducer", "divergence_rows", "same_tokenizer", "id_space"]

NAN = float("nan")


@dataclass
class PairText:
    """One text as each model reads it. ``alignment`` None: the same ids on both sides (unit token)."""

    a: Tokenization
    b: Tokenization
    alignment: Alignment | None = None
    meta: dict = field(default_factory=dict)


def same_tokenizer(tok_a: Any, tok_b: Any) -> bool:
    """True when both tokenizers map every string to the same id (the per-token unit applies)."""
    return len(tok_a) == len(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()



def id_space(base_tok: Any, tuned_tok: Any, tuned_rows: int | None = None) -> str | None:
    """How both models read one set of ids: ``"one tokenizer"``; ``"base ids"`` where the tuned
    tokenizer extends the base's (every base token at the same id, the same chat template, and the
    tuned model has an embedding row for each: the tuned model then reads the base's tokenization);
    None where they cannot (a response readout then measures nothing and says so). tuned_rows: the
    tuned model's embedding rows (None: not checked)."""
    if same_tokenizer(base_tok, tuned_tok):
        return "one tokenizer"
    va, vb = base_tok.get_vocab(), tuned_tok.get_vocab()
    if getattr(base_tok, "chat_template", None) != getattr(tuned_tok, "chat_template", None) or \
            any(vb.get(t) != i for t, i in va.items()) or (tuned_rows is not None and tuned_rows < max(va.values()) + 1):
        return None
    return "base ids"

def _device(model: Any) -> torch.device:
    return input_device(model)


#: tokens (rows x length) per forward pass of :func:`final_hidden`: a larger batch runs in slices of
#: rows, so the forward's own transient memory (MLP activations, attention) stays bounded
FORWARD_TOKENS = 8192


@torch.no_grad()
def final_hidden(model: Any, batch, max_tokens: int = FORWARD_TOKENS) -> torch.Tensor:
    """Teacher-forced forward of a left-padded :class:`~mechdiff.data.prompts.Batch`: the hidden
    states the output layer reads, ``[B, T, d]`` (rows in slices of at most ``max_tokens`` tokens,
    each its own forward). The output layer itself runs on one position only."""
    head = model.get_output_embeddings()
    if head is None:
        raise DataError(f"{type(model).__name__} has no output layer (LM head) to read next-token "
                        "distributions from")
    kept: list[torch.Tensor] = []

    def pre(mod, args):
        kept.append(args[0])
        return (args[0][:, -1:].contiguous(),) + tuple(args[1:])

    inputs = batch.to(_device(model)).model_inputs()
    B, T = inputs["input_ids"].shape
    step = max(1, max_tokens // max(T, 1))
    h = head.register_forward_pre_hook(pre)
    try:
        for i in range(0, B, step):
            model(**{k: None if v is None else v[i:i + step] for k, v in inputs.items()}, use_cache=False)
    finally:
        h.remove()
    return kept[0] if len(kept) == 1 else torch.cat(kept)


def head_logits(model: Any, h: torch.Tensor) -> torch.Tensor:
    """The model's output layer on hidden states ``[n, d]`` -> float32 logits ``[n, V]`` (with the
    model's final logit soft-capping, as its forward applies it)."""
    logits = model.get_output_embeddings()(h).float()
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class RowReducer:
    """Per-row reductions of two models' next-token distributions, ``chunk`` rows at a time.

    a_ids/b_ids: the shared vocabulary in each model's ids (same string at the same index).
    full: the two tokenizers are the same (unmasked KL is defined).
    """

    def __init__(self, model_a: Any, model_b: Any, a_ids: torch.Tensor, b_ids: torch.Tensor, *,
                 full: bool, budget_bytes: int = 1 << 30):
        self.models = (model_a, model_b)
        self.full = full
        self.ids = (torch.as_tensor(a_ids, dtype=torch.long), torch.as_tensor(b_ids, dtype=torch.long))
        if self.ids[0].numel() == 0:
            raise DataError("the two tokenizers share no vocabulary: nothing to compare per token")
        vs = [int(m.get_output_embeddings().weight.shape[0]) for m in self.models]
        self.chunk = max(1, budget_bytes // (max(vs) * 4 * 8))     # ~8 float32 [rows, V] temporaries
        # the shared vocabulary is the whole vocabulary in order on both sides: masked = full, computed once
        self.whole = all(i.numel() == v and torch.equal(i, torch.arange(v)) for i, v in zip(self.ids, vs))

    def _side(self, s: int, h: torch.Tensor, nxt: torch.Tensor):
        model = self.models[s]
        logits = head_logits(model, h)
        lsm = torch.log_softmax(logits, -1)
        nxt = nxt.to(lsm.device)
        logp = lsm.gather(-1, nxt[:, None])[:, 0]
        rank = (logits > logits.gather(-1, nxt[:, None])).sum(-1)
        return logits, lsm, logp, rank

    @torch.no_grad()
    def token_stats(self, s: int, h: torch.Tensor, nxt: torch.Tensor) -> dict[str, torch.Tensor]:
        """Side ``s`` (0 base, 1 tuned): log-prob and rank of ``nxt [n]`` after hidden rows ``h [n, d]``."""
        out = {"logp": [], "rank": []}
        for i in range(0, h.shape[0], self.chunk):
            _, _, logp, rank = self._side(s, h[i:i + self.chunk], nxt[i:i + self.chunk])
            out["logp"].append(logp)
            out["rank"].append(rank)
        return {k: torch.cat(v).cpu() if v else torch.zeros(0) for k, v in out.items()}

    @torch.no_grad()
    def pair_stats(self, h_a: torch.Tensor, h_b: torch.Tensor, nxt_a: torch.Tensor, nxt_b: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
        """Every :data:`TOKEN_FIELDS` entry but start/end for paired rows ``h_a [n, d]``, ``h_b [n, d]``
        (the distributions that predict ``nxt_a``/``nxt_b``) -> ``{field: [n]}`` on the CPU."""
        keys = [k for k in TOKEN_FIELDS if k not in ("start", "end")]
        out: dict[str, list] = {k: [] for k in keys}
        for i in range(0, h_a.shape[0], self.chunk):
            sl = slice(i, i + self.chunk)
            la, lsa, lp_a, rk_a = self._side(0, h_a[sl], nxt_a[sl])
            lb, lsb, lp_b, rk_b = self._side(1, h_b[sl], nxt_b[sl])
            if self.whole:
                lpa, lpb = lsa, lsb.to(lsa.device)
                drop_a = drop_b = torch.zeros_like(lp_a)
            else:
                ia, ib = self.ids[0].to(la.device), self.ids[1].to(lb.device)
                lpa = torch.log_softmax(la.index_select(-1, ia), -1)
                lpb = torch.log_softmax(lb.index_select(-1, ib), -1).to(lpa.device)
                drop_a = (1 - lsa.index_select(-1, ia).exp().sum(-1)).clamp_min(0)
                drop_b = (1 - lsb.index_select(-1, ib).exp().sum(-1)).clamp_min(0).to(drop_a.device)
            r = {"kl_bt": _kl(lpa, lpb), "kl_tb": _kl(lpb, lpa), "dropped_base": drop_a, "dropped_tuned": drop_b,
                 "logp_base": lp_a, "logp_tuned": lp_b.to(lp_a.device), "rank_in_base": rk_a,
                 "rank_in_tuned": rk_b.to(rk_a.device)}
            if self.whole:
                r["kl_bt_full"], r["kl_tb_full"] = r["kl_bt"], r["kl_tb"]
            elif self.full:
                lsb_ = lsb.to(lsa.device)
                r["kl_bt_full"], r["kl_tb_full"] = _kl(lsa, lsb_), _kl(lsb_, lsa)
            else:
                r["kl_bt_full"] = r["kl_tb_full"] = torch.full_like(lp_a, NAN)
            for k in keys:
                out[k].append(r[k])
        return {k: torch.cat(v).cpu() for k, v in out.items()}


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row from log-probs ``[n, V]``; terms with p = 0 count 0."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1).clamp_min(0)


def _hidden_rows(model: Any, toks: Sequence[Tokenization], tok: Any) -> list[torch.Tensor]:
    """Final hidden states of each text's tokens, ``[n_i, d]`` per text (one batched forward)."""
    enc = [Encoded(str(i), t.text, list(t.ids), [True] * len(t.ids)) for i, t in enumerate(toks)]
    b = collate(enc, pad_id_of(tok))
    h = final_hidden(model, b)
    T = h.shape[1]
    return [h[i, T - len(t.ids):] for i, t in enumerate(toks)]


def divergence_rows(reducer: RowReducer, tok_a: Any, tok_b: Any, texts: Sequence[PairText]
                    ) -> list[dict[str, torch.Tensor]]:
    """Rows for each text of one batch: ``{field: [n_rows]}`` for every :data:`TOKEN_FIELDS` entry
    (start/end as character offsets into side A's text)."""
    ha = _hidden_rows(reducer.models[0], [t.a for t in texts], tok_a)
    hb = _hidden_rows(reducer.models[1], [t.b for t in texts], tok_b)
    out = []
    for t, xa, xb in zip(texts, ha, hb):
        out.append(_token_rows(reducer, t, xa, xb) if t.alignment is None else _span_rows(reducer, t, xa, xb))
    return out


def _token_rows(red: RowReducer, t: PairText, xa: torch.Tensor, xb: torch.Tensor) -> dict[str, torch.Tensor]:
    if t.a.ids != t.b.ids:
        raise DataError("unit 'token' needs the same ids on both sides; align the texts (unit 'span')")
    n = len(t.a.ids)
    nxt = torch.tensor(t.a.ids[1:], dtype=torch.long)
    r = red.pair_stats(xa[:n - 1], xb[:n - 1], nxt, nxt)
    r["start"] = torch.tensor([s for s, _ in t.a.offsets[1:]], dtype=torch.long)
    r["end"] = torch.tensor([e for _, e in t.a.offsets[1:]], dtype=torch.long)
    return r


def _span_rows(red: RowReducer, t: PairText, xa: torch.Tensor, xb: torch.Tensor) -> dict[str, torch.Tensor]:
    al = t.alignment
    per_side = []
    for s, (tk, x) in enumerate(((t.a, xa), (t.b, xb))):
        nxt = torch.tensor(tk.ids[1:], dtype=torch.long)
        st = red.token_stats(s, x[:len(tk.ids) - 1], nxt)
        # log-prob of token i (its prediction sits at row i - 1); token 0 has none
        per_side.append(torch.cat([torch.tensor([NAN]), st["logp"].double()]))
    starts_a = [a0 for a0, _ in al.a_tokens]
    starts_b = [b0 for b0, _ in al.b_tokens]
    ok = [a0 > 0 and b0 > 0 for a0, b0 in zip(starts_a, starts_b)]
    keep = [k for k, o in enumerate(ok) if o]
    n = len(al.spans)
    fields = [k for k in TOKEN_FIELDS if k not in ("start", "end")]
    r = {k: torch.full((n,), NAN) for k in fields}
    r["rank_in_base"] = torch.full((n,), -1, dtype=torch.long)
    r["rank_in_tuned"] = torch.full((n,), -1, dtype=torch.long)
    if keep:
        ia = torch.tensor([starts_a[k] - 1 for k in keep])
        ib = torch.tensor([starts_b[k] - 1 for k in keep])
        na = torch.tensor([t.a.ids[starts_a[k]] for k in keep])
        nb = torch.tensor([t.b.ids[starts_b[k]] for k in keep])
        st = red.pair_stats(xa[ia.to(xa.device)], xb[ib.to(xb.device)], na, nb)
        idx = torch.tensor(keep)
        for k in fields:
            r[k][idx] = st[k].to(r[k].dtype)
    for k, (lp, groups) in (("logp_base", (per_side[0], al.a_tokens)), ("logp_tuned", (per_side[1], al.b_tokens))):
        r[k] = torch.stack([lp[g0:g1].sum() for g0, g1 in groups]).float() if groups else torch.zeros(0)
    r["start"] = torch.tensor([s for s, _ in al.spans], dtype=torch.long)
    r["end"] = torch.tensor([e for _, e in al.spans], dtype=torch.long)
    return r


def pair_text(tok_a: Any, tok_b: Any, text_a: str, text_b: str | None = None,
              regions_a: Sequence[tuple[int, int]] | None = None,
              regions_b: Sequence[tuple[int, int]] | None = None, *, unit: str = "span",
              add_special_tokens: bool | tuple[bool, bool] = True, meta: dict | None = None) -> PairText:
    """Tokenize one text for each side (``text_b`` defaults to ``text_a``) and, for ``unit="span"``,
    align the regions both sides share (default: the whole text). ``add_special_tokens``: one flag
    or one per side (False for a text a chat template rendered: it holds its specials). A side whose tokens start with
    text (no special token, e.g. SmolLM2 adds no BOS) gets its BOS in front, so the first token has
    a prediction too."""
    text_b = text_a if text_b is None else text_b
    sp_a, sp_b = add_special_tokens if isinstance(add_special_tokens, tuple) else (add_special_tokens,) * 2
    a = _with_bos(tokenize_text(tok_a, text_a, sp_a), tok_a)
    b = _with_bos(tokenize_text(tok_b, text_b, sp_b), tok_b)
    if unit == "token":
        if text_a != text_b or a.ids != b.ids:
            raise DataError("unit 'token' needs the same text and ids on both sides; use unit 'span'")
        return PairText(a, b, None, dict(meta or {}))
    al = align_regions(a, b, regions_a or [(0, len(text_a))], regions_b or [(0, len(text_b))])
    return PairText(a, b, al, dict(meta or {}))


def _with_bos(t: Tokenization, tok: Any) -> Tokenization:
    bos = getattr(tok, "bos_token_id", None)
    if bos is None or (t.special and t.special[0]):
        return t
    return Tokenization(t.text, [int(bos)] + t.ids, [(0, 0)] + t.offsets, [True] + t.special)

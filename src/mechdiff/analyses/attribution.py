"""Per-head attribution of a target scalar: grad x activation and integrated gradients on ``head_z``.

A :class:`Target` is a scalar per prompt read from the next-token logits at the measured position
(``"decision"``: the last content token; ``"last"``: the end of the prompt), over the shared
vocabulary (masked log-softmax) so an extended tokenizer cannot move it:

- ``kind="logprob"``: ``log p(ids[i])`` in nats (math: the correct answer's first token; default
  readout of ``mechdiff heads``: the *base* model's clean top token, scored in both models so both
  sides measure the same scalar);
- ``kind="refusal"``: ``100 * sigmoid(log p(ids[i, 0]) - log p(ids[i, 1]))`` in points, the
  soft-refusal score of the first token of a refusal vs a neutral continuation.

:func:`grad_x_act` returns ``[N, n_layers, H]``: ``grad_z . z`` per head at the decision token,
the first-order estimate of ``target(clean) - target(head zeroed at the decision token)`` (the
zero-ablation effect of :mod:`mechdiff.experiments.heads`). :func:`integrated_gradients` integrates
the gradient along ``alpha * z`` (alpha 0..1, midpoint rule, ``m`` steps) for one layer at a time,
so the heads of a layer sum to ``target(clean) - target(whole layer zeroed)`` as m grows.

Memory: parameters are frozen for the pass and the first requested layer's ``head_z`` becomes a
leaf, so autograd records nothing below it; only the layers from there up keep activations.
Built on :func:`mechdiff.sites.hooks.hooked` (no PatchEngine involved).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from mechdiff.errors import ConfigError, DataError, NumericsError
from mechdiff.sites.hooks import hooked
from mechdiff.sites.names import resolve

KINDS = ("logprob", "logit", "refusal")
MEASURES = ("decision", "last")


@dataclass
class Target:
    """ids: ``[N]`` (logprob) or ``[N, 2]`` (refusal: refusal, neutral token) in this model's
    vocabulary; allowed_ids: the shared vocabulary ids of this model (None: the whole vocabulary)."""

    ids: torch.Tensor
    kind: str = "logprob"
    allowed_ids: torch.Tensor | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"target kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        self.ids = torch.as_tensor(self.ids, dtype=torch.long)
        want = 2 if self.kind == "refusal" else 1
        if self.ids.dim() != want or (want == 2 and self.ids.shape[1] != 2):
            raise ConfigError(f"a {self.kind!r} target needs ids of shape {'[N]' if want == 1 else '[N, 2]'}, "
                              f"got {tuple(self.ids.shape)}")

    @property
    def unit(self) -> str:
        return {"logprob": "nats", "logit": "logits", "refusal": "points"}[self.kind]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def score(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``logits [..., b, V]`` of prompts ``rows [b]`` -> ``[..., b]`` (float32, float64 logits stay
        float64; differentiable)."""
        lg = logits if logits.dtype == torch.float64 else logits.float()
        ids = self.ids.to(lg.device)[rows.to(lg.device)]                 # [b] or [b, 2]
        if self.kind == "logit":
            pick = lg.gather(-1, ids.expand(*lg.shape[:-1])[..., None])[..., 0]
            ref = lg.mean(-1) if self.allowed_ids is None else \
                lg.index_select(-1, torch.as_tensor(self.allowed_ids, device=lg.device)).mean(-1)
            return pick - ref
        if self.allowed_ids is not None:
            from mechdiff.fairness import allowed_mask
            lg = lg.masked_fill(~allowed_mask(self.allowed_ids, lg.shape[-1], device=lg.device), float("-inf"))
        lp = torch.log_softmax(lg, -1)
        if self.kind == "logprob":
            return lp.gather(-1, ids.expand(*lp.shape[:-1])[..., None])[..., 0]
        a = lp.gather(-1, ids[:, 0].expand(*lp.shape[:-1])[..., None])[..., 0]
        b = lp.gather(-1, ids[:, 1].expand(*lp.shape[:-1])[..., None])[..., 0]
        return 100.0 * torch.sigmoid(a - b)

    def reducer(self):
        """``reduce`` for :meth:`PatchEngine.run` / ``patch_measure``: the score of each variant."""
        return lambda engine, i, j: (lambda logits, rows: self.score(logits, rows + i))


def first_token(tokenizer, text: str) -> int:
    """Id of the first token of ``text`` tokenised on its own (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"target text {text!r} tokenises to nothing; give a non-empty answer/continuation")
    return int(ids[0])


# ---- the differentiable pass ---------------------------------------------------------------

@contextmanager
def _frozen(model):
    """Parameters do not require grad inside the block (restored after), so autograd records only
    what depends on the leaves we create."""
    was = [p for p in model.parameters() if p.requires_grad]
    for p in was:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in was:
            p.requires_grad_(True)


def measured_positions(batch, measure: str) -> torch.Tensor:
    """``[B]`` where the readout is read: the decision token, or the end of the prompt (``"last"``)."""
    if measure not in MEASURES:
        raise ConfigError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    T = batch.input_ids.shape[1]
    return batch.decision.long() if measure == "decision" else torch.full_like(batch.decision.long(), T - 1)


def logits_at(model, batch, pos: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` logits at ``pos [B]`` (the LM head runs on those positions only; differentiable)."""
    head = model.get_output_embeddings()
    rows = torch.arange(pos.shape[0], device=pos.device)

    def pre(mod, args):       # args[0] on the head's device (a sharded model: the last GPU)
        h = args[0]
        return (h[rows.to(h.device), pos.to(h.device)][:, None],) + tuple(args[1:])

    kw = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 0          # all (= the one position the pre-hook keeps)
    handle = head.register_forward_pre_hook(pre)
    try:
        return model(**batch.model_inputs(), **kw).logits[:, 0]
    finally:
        handle.remove()


def _no_cudnn_sdpa():
    """The differentiable pass runs without the cuDNN SDPA kernel (flash / mem-efficient / math stay).

    With left padding, a pad query row attends to nothing (causal + padding mask). cuDNN's SDPA
    backward (picked by torch for bf16 when the padded length suits it, e.g. T = 64 on an H200)
    returns NaN for such fully masked rows, and the NaN reaches the key/value gradients of every
    position of that prompt: every head of every padded prompt of the batch came back NaN.
    The other kernels give those rows an exact zero gradient."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:                                     # pragma: no cover (old torch)
        return nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _pass(model, batch, target: Target, rows: torch.Tensor, layers: Sequence[int], measure: str,
          scale: dict | None = None) -> tuple[torch.Tensor, dict]:
    """One forward + backward. Returns (target scores [B], {layer: (z [B, H, hd], grad [B, H, hd])}) at
    the decision token. ``scale`` {layer: alpha}: that layer's decision-token head_z is ``alpha * z``
    (z: the value computed there) and becomes the leaf (integrated gradients)."""
    from mechdiff.scale.devices import input_device
    dev = input_device(model)
    b = batch.to(dev)
    B = b.input_ids.shape[0]
    ar = torch.arange(B, device=dev)
    dec = b.decision.long()
    first = min(layers)
    kept: dict[int, torch.Tensor] = {}
    clean: dict[int, torch.Tensor] = {}

    def edit(layer):
        def f(t):                               # t: [B, T, H, hd] (on this layer's device)
            a, d = ar.to(t.device), dec.to(t.device)
            if scale is not None and layer in scale:
                clean[layer] = t[a, d].detach()
                leaf = (scale[layer] * clean[layer]).requires_grad_(True)
                out = t.detach().clone() if layer == first else t.clone()
                out[a, d] = leaf
                kept[layer] = leaf
                return out
            if layer == first:
                t = t.detach().requires_grad_(True)
            kept[layer] = t
            return t
        return f

    with _frozen(model), torch.enable_grad(), _no_cudnn_sdpa(), \
            hooked(model, edit={f"head_z.{l}": edit(l) for l in sorted(set(layers))}):
        logits = logits_at(model, b, measured_positions(b, measure).to(dev))
        y = target.score(logits, rows)
        grads = torch.autograd.grad(y.sum(), [kept[l] for l in layers])
    out = {}
    for l, g in zip(layers, grads):
        gd = g if scale is not None and l in scale else g[ar.to(g.device), dec.to(g.device)]
        if not bool(torch.isfinite(gd).all()):
            bad = (~torch.isfinite(gd.flatten(1))).any(1).nonzero().flatten().tolist()
            raise NumericsError(f"attribution: non-finite gradient at layer {l}'s head_z for prompts "
                                f"{[int(rows[i]) for i in bad[:8]]} (batch rows {bad[:8]}); the scores are "
                                f"{'finite' if bool(torch.isfinite(y).all()) else 'non-finite'}")
    for l, g in zip(layers, grads):
        if scale is not None and l in scale:
            out[l] = (_f(clean[l]).to(dev), _f(g).to(dev))      # one device for all layers
        else:
            a, d = ar.to(g.device), dec.to(g.device)
            out[l] = (_f(kept[l][a, d].detach()).to(dev), _f(g[a, d]).to(dev))
    return _f(y.detach()).to(dev), out


def _f(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for a float64 model (exact tests)."""
    return t if t.dtype == torch.float64 else t.float()


@torch.no_grad()
def clean_scores(model, batch, target: Target, rows: torch.Tensor, measure: str = "decision") -> torch.Tensor:
    """``[B]`` target scores of the clean model on ``batch`` (prompts ``rows`` of the target), CPU."""
    from mechdiff.scale.devices import input_device
    b = batch.to(input_device(model))
    return target.score(logits_at(model, b, measured_positions(b, measure)), rows).cpu()


def _chunks(tokenizer, prompts, batch_size: int):
    from mechdiff.data.prompts import encode
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(prompts), batch_size):
        yield i, encode(tokenizer, prompts[i:i + batch_size])


def _check(model, prompts, target: Target, layers) -> list[int]:
    sm = resolve(model)
    layers = sorted(set(int(l) for l in layers))
    if not layers:
        raise ConfigError("attribution needs at least one layer")
    for l in layers:
        sm.check("head_z", l)
    if len(target) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but the target has {len(target)} rows")
    return layers


def grad_x_act(model, tokenizer, prompts: Sequence, target: Target, layers: Sequence[int], *,
               measure: str = "decision", batch_size: int = 16) -> dict:
    """grad x activation per head at the decision token.

    Returns ``{"layers": [...], "attr": [N, n_layers, H], "score": [N]}`` (float32, CPU): ``attr[i, j,
    h] = sum_k dtarget/dz[h, k] * z[h, k]`` of head h at ``layers[j]``; ``score`` the clean target.
    """
    layers = _check(model, prompts, target, layers)
    attrs, scores = [], []
    for i, batch in _chunks(tokenizer, prompts, batch_size):
        rows = torch.arange(i, i + batch.input_ids.shape[0])
        y, zg = _pass(model, batch, target, rows, layers, measure)
        attrs.append(torch.stack([(zg[l][0] * zg[l][1]).sum(-1) for l in layers], 1).cpu())
        scores.append(y.cpu())
    return {"layers": layers, "attr": torch.cat(attrs), "score": torch.cat(scores)}


def integrated_gradients(model, tokenizer, prompts: Sequence, target: Target, layers: Sequence[int], *,
                         steps: int = 16, measure: str = "decision", batch_size: int = 16) -> dict:
    """Integrated gradients from a zero baseline, per layer (that layer's heads scaled together).

    Same return shape as :func:`grad_x_act`; ``attr[:, j].sum(-1)`` ~ ``score - score(layer j's
    head_z zeroed at the decision token)`` (exact as ``steps`` grows). Cost: ``steps x n_layers``
    forward+backward passes.
    """
    if steps < 1:
        raise ConfigError(f"ig_steps must be >= 1, got {steps}")
    layers = _check(model, prompts, target, layers)
    attrs, scores = [], []
    for i, batch in _chunks(tokenizer, prompts, batch_size):
        rows = torch.arange(i, i + batch.input_ids.shape[0])
        per_layer = []
        for l in layers:
            acc = None
            for k in range(steps):
                _, zg = _pass(model, batch, target, rows, [l], measure, scale={l: (k + 0.5) / steps})
                z, g = zg[l]
                acc = g if acc is None else acc + g
            per_layer.append((z * acc / steps).sum(-1))
        attrs.append(torch.stack(per_layer, 1).cpu())
        scores.append(clean_scores(model, batch, target, rows, measure))
    return {"layers": layers, "attr": torch.cat(attrs), "score": torch.cat(scores)}

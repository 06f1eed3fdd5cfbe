"""Path patching: the effect of one head through one named downstream receiver only.

The sender is head ``h`` of layer ``l`` (its ``head_z`` slice at the decision token is set to
``value``: zeros by default). Its effect on the target readout travels along many paths; the
receiver picks the first hop after the sender:

- ``"logits"``: the direct path (the final residual gets the head's change, no later layer sees it);
- ``"attn_out.L2"`` / ``"mlp_out.L2"``: through layer L2's attention / MLP branch (``L2 > l``, or
  ``L2 >= l`` for an MLP);
- ``"head.L2.H2"``: through head H2 of layer L2 (``L2 > l``; the other heads of L2 stay clean).

Three full forward passes per chunk of prompts (hooks from :mod:`mechdiff.sites.hooks`):

1. clean: record every branch output between sender and receiver (``attn_out``/``mlp_out``, all
   positions) and the receiver;
2. sender patched, those branches frozen to their clean values: record the receiver -> ``R``;
3. clean run with the receiver set to ``R``: the readout. Later layers run freely, so the path
   effect counts every route whose first hop after the sender is the receiver.

Effects are ``target(clean) - target(patched)`` per prompt (positive: the head supports the
target through that path). To first order the path effects over all first hops (logits, every later
attention and MLP branch) sum to the total effect.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mechdiff.analyses.attribution import Target, logits_at, measured_positions
from mechdiff.errors import ConfigError
from mechdiff.sites.hooks import hooked
from mechdiff.sites.names import resolve


def parse_receiver(receiver: str, layer: int, n_layers: int) -> tuple[str, int, int | None]:
    """``(kind, layer, head)`` with kind in logits | attn_out | mlp_out | head; ConfigError if the
    receiver is not downstream of a sender at ``layer``."""
    r = receiver.strip()
    if r == "logits":
        return "logits", n_layers - 1, None
    parts = r.split(".")
    try:
        if parts[0] == "head" and len(parts) == 3:
            kind, l2, h2 = "head", int(parts[1]), int(parts[2])
        elif parts[0] in ("attn_out", "mlp_out") and len(parts) == 2:
            kind, l2, h2 = parts[0], int(parts[1]), None
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(f"receiver {receiver!r}: use logits, attn_out.L, mlp_out.L or head.L.H") from None
    if not 0 <= l2 < n_layers:
        raise ConfigError(f"receiver {receiver!r}: layer {l2} is out of range 0..{n_layers - 1}")
    if (kind == "mlp_out" and l2 < layer) or (kind != "mlp_out" and l2 <= layer):
        raise ConfigError(f"receiver {receiver!r} is not downstream of a head in layer {layer}")
    return kind, l2, h2


def _frozen_sites(layer: int, kind: str, l2: int, n_layers: int) -> list[str]:
    """Branch outputs strictly between the sender (head_z.layer) and the receiver, forward order."""
    out = []
    for k in range(layer, n_layers):
        for name in ("attn_out", "mlp_out"):
            if name == "attn_out" and k == layer:
                continue                          # the sender's own attention output carries it
            if kind != "logits" and (k > l2 or (k == l2 and (name == "mlp_out" or kind != "mlp_out"))):
                return out
            out.append(f"{name}.{k}")
    return out


@torch.no_grad()
def path_patch(model, tokenizer, prompts: Sequence, target: Target, layer: int, head: int, receiver: str,
               *, value: torch.Tensor | None = None, measure: str = "decision", batch_size: int = 16) -> dict:
    """Effect of head ``(layer, head)`` through ``receiver`` only, and its total effect.

    value: ``[N, head_dim]`` or ``[head_dim]`` written into the head at the decision token (None:
    zeros). Returns ``{"path": [N], "total": [N], "clean": [N], "receiver": receiver}`` (float32 CPU).
    """
    from mechdiff.data.prompts import encode
    sm = resolve(model)
    sm.check("head_z", layer)
    if not 0 <= head < sm.n_heads:
        raise ConfigError(f"head {head} is out of range 0..{sm.n_heads - 1}")
    kind, l2, h2 = parse_receiver(receiver, layer, sm.n_layers)
    if h2 is not None and not 0 <= h2 < sm.n_heads:
        raise ConfigError(f"receiver {receiver!r}: head {h2} is out of range 0..{sm.n_heads - 1}")
    if len(target) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but the target has {len(target)} rows")
    frozen = _frozen_sites(layer, kind, l2, sm.n_layers)
    rsite = {"logits": f"resid_post.{sm.n_layers - 1}", "head": f"head_z.{l2}"}.get(kind, f"{kind}.{l2}")
    from mechdiff.scale.devices import input_device
    dev = input_device(model)
    res = {"path": [], "total": [], "clean": []}
    for i in range(0, len(prompts), batch_size):
        b = encode(tokenizer, prompts[i:i + batch_size]).to(dev)
        B = b.input_ids.shape[0]
        rows, ar, dec = torch.arange(i, i + B), torch.arange(B, device=dev), b.decision.long()
        pos = measured_positions(b, measure)
        v = torch.zeros(sm.head_dim) if value is None else value
        v = (v[i:i + B] if v.dim() == 2 else v.expand(B, -1)).to(dev)

        def sender(t):                            # [B, T, H, hd]
            out = t.clone()
            out[ar.to(t.device), dec.to(t.device), head] = v.to(device=t.device, dtype=t.dtype)
            return out

        with hooked(model, read=frozen + [rsite]) as rec:
            clean = target.score(logits_at(model, b, pos), rows)
        with hooked(model, read=[rsite], edit={f"head_z.{layer}": sender, **{
                s: (lambda t, s=s: rec[s].to(device=t.device, dtype=t.dtype)) for s in frozen}}) as new:
            logits_at(model, b, pos)
        R = new[rsite]
        if kind == "head":
            def put(t, R=R):
                out = t.clone()
                out[:, :, h2] = R[:, :, h2].to(device=t.device, dtype=t.dtype)
                return out
        else:
            def put(t, R=R):
                return R.to(device=t.device, dtype=t.dtype)
        with hooked(model, edit={rsite: put}):
            path = target.score(logits_at(model, b, pos), rows)
        with hooked(model, edit={f"head_z.{layer}": sender}):
            total = target.score(logits_at(model, b, pos), rows)
        res["clean"].append(clean.cpu())
        res["path"].append((clean - path).cpu())
        res["total"].append((clean - total).cpu())
    return {**{k: torch.cat(v) for k, v in res.items()}, "receiver": receiver}


def first_hops(layer: int, n_layers: int) -> list[str]:
    """Every receiver a head of ``layer`` reaches first: its layer's MLP, each later attention and
    MLP branch, and the logits (their path effects sum to the total to first order)."""
    return [f"mlp_out.{layer}"] + [f"{n}.{k}" for k in range(layer + 1, n_layers)
                                   for n in ("attn_out", "mlp_out")] + ["logits"]

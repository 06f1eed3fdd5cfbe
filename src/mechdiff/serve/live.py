"""The live panel: both models of a run's pair, loaded once on first use, answering one prompt at a time.

``LiveSession(pair).ask(Ask(...))`` -> both models' next-token distributions (top tokens, KL in both
directions over the shared vocabulary) and greedy continuations, and optionally the same for one side
with a saved RQ3 handle applied at a chosen layer, k and strength. Input is bounded (:data:`MAX_PROMPT_CHARS`,
:data:`MAX_NEW_TOKENS`, :data:`MAX_TOP`); a second request while one runs gets :class:`Busy`.
"""
from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mechdiff.patching.kl import kl_from_logits, kl_shared
from mechdiff.analyses.steering import MODES, Handle
from mechdiff.errors import ConfigError, MechdiffError
from mechdiff.fairness import shared_vocab
from mechdiff.models.load import LoadedModel, load_model
from mechdiff.pairs.spec import ModelSpec, Pair

MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 64
MAX_TOP = 20


class Busy(MechdiffError):
    """The model pair is answering another request."""


@dataclass
class Ask:
    """One live request (checked against the bounds on construction)."""

    prompt: str
    new_tokens: int = 16
    top: int = 10
    chat: bool = True
    handle: Path | None = None      # a handle prefix inside a served run
    layer: int | None = None        # None: the handle's own layer
    k: int | None = None            # None: all of the handle's columns
    alpha: float | None = None      # None: the handle's own strength
    mode: str | None = None         # None: the handle's own mode
    side: str | None = None         # "base" | "tuned"; None: base for steer/add, tuned for ablate

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError("type a prompt")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise ConfigError(f"prompt too long ({len(self.prompt)} characters; at most {MAX_PROMPT_CHARS})")
        for name, hi in (("new_tokens", MAX_NEW_TOKENS), ("top", MAX_TOP)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
                raise ConfigError(f"{name} must be an integer from 0 to {hi}, got {v!r}")
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.side not in (None, "base", "tuned"):
            raise ConfigError(f"side must be base or tuned, got {self.side!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and abs(self.alpha) <= 100):
            raise ConfigError(f"strength must be a number within +-100, got {self.alpha!r}")


class LiveSession:
    """A pair's two models for the live panel: loaded on the first request (``status`` tells how far)."""

    def __init__(self, pair: Pair, device: str = "cpu"):
        self.pair, self.device = pair, device
        self.models: dict[str, LoadedModel] = {}
        self.status = {"state": "idle", "message": "models load on the first prompt"}
        self._load_lock, self._run_lock = threading.Lock(), threading.Lock()
        self._shared = None

    def ensure_loaded(self) -> None:
        with self._load_lock:
            if self.models:
                return
            try:
                for side, spec in (("base", self.pair.base), ("tuned", self.pair.tuned)):
                    self.status = {"state": "loading", "message": f"loading the {side} model ({spec}) ..."}
                    t0 = time.perf_counter()
                    # never trust_remote_code here: nothing from a model directory is executed
                    self.models[side] = load_model(spec, dtype=self.pair.dtype, device=self.device)
                    self.status["message"] += f" {time.perf_counter() - t0:.1f}s"
                tb, tt = self.models["base"].tokenizer, self.models["tuned"].tokenizer
                if tb.get_vocab() != tt.get_vocab():
                    self.status = {"state": "loading", "message": "matching the two vocabularies (the tokenizers differ) ..."}
                self._shared = None if tb.get_vocab() == tt.get_vocab() else shared_vocab(tb, tt)
            except Exception as e:
                self.models = {}
                self.status = {"state": "error", "message": f"could not load the models: {type(e).__name__}: {e}"}
                raise
            self.status = {"state": "ready", "message": f"loaded {self.pair.base} and {self.pair.tuned}"}

    def ask(self, q: Ask) -> dict:
        """Both models on ``q.prompt`` (and one side with the handle); raises :class:`Busy` if taken."""
        if not self._run_lock.acquire(blocking=False):
            raise Busy("the models are answering another prompt; try again when it finishes")
        try:
            self.ensure_loaded()
            h, side = self._handle(q) if q.handle is not None else (None, None)     # a bad handle fails first
            out = {s: self._side(s, q, None) for s in ("base", "tuned")}
            res: dict[str, Any] = {"prompt": q.prompt, "columns": [out["base"], out["tuned"]],
                                   "kl": self._kl(out["base"]["_logits"], out["tuned"]["_logits"])}
            if h is not None:
                edited = self._side(side, q, h)
                other = "tuned" if side == "base" else "base"
                pair = (edited["_logits"], out[other]["_logits"]) if side == "base" else (out[other]["_logits"], edited["_logits"])
                edited["kl_to_other"] = self._kl(*pair)
                edited["kl_to_self"] = {"bt": float(kl_from_logits(out[side]["_logits"], edited["_logits"]))}
                res["columns"].append(edited)
            for c in res["columns"]:
                c.pop("_logits")
            return res
        finally:
            self._run_lock.release()

    def _handle(self, q: Ask) -> tuple[Handle, str]:
        h = Handle.load(q.handle)
        mode = q.mode or h.mode
        k = h.k if q.k is None else q.k
        if not 1 <= k <= h.k:
            raise ConfigError(f"k must be from 1 to {h.k} for this handle, got {k}")
        side = q.side or ("tuned" if mode == "ablate" else "base")
        m = self.models[side]
        layer = h.layer if q.layer is None else q.layer
        if not 0 <= layer < m.n_layers:
            raise ConfigError(f"layer must be from 0 to {m.n_layers - 1}, got {layer}")
        if h.basis.shape[0] != m.d_model and h.site != "head_z":
            raise ConfigError(f"the handle's width {h.basis.shape[0]} does not match the {side} model's {m.d_model}")
        return Handle(layer=layer, site=h.site, basis=h.basis[:, :k], mode=mode,
                      alpha=h.alpha if q.alpha is None else float(q.alpha), scale=h.scale,
                      provenance=h.provenance), side

    def _ids(self, m: LoadedModel, q: Ask) -> torch.Tensor:
        tok = m.tokenizer
        if q.chat and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": q.prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = tok(q.prompt, return_tensors="pt")["input_ids"]
        return ids.to(m.device)

    @torch.no_grad()
    def _side(self, side: str, q: Ask, handle: Handle | None) -> dict:
        m = self.models[side]
        tok, ids = m.tokenizer, self._ids(m, q)
        ctx = handle.apply(m.model) if handle is not None else nullcontext()
        with ctx:
            logits = m.model(input_ids=ids).logits[0, -1].float().cpu()
            gen = ids
            if q.new_tokens:
                gen = m.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=q.new_tokens, pad_token_id=tok.pad_token_id)
        probs = torch.softmax(logits, -1)
        top = torch.topk(probs, min(q.top, probs.numel()))
        label = side if handle is None else (f"{side} + handle ({handle.mode}, L{handle.layer}, k={handle.k}, "
                                             f"strength {handle.alpha:g})")
        return {"label": label, "side": side, "model": m.name, "n_prompt_tokens": int(ids.shape[1]),
                "top": [{"token": tok.decode([int(i)]), "id": int(i), "p": float(p)} for p, i in zip(top.values, top.indices)],
                "continuation": tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True),
                "_logits": logits}

    def _kl(self, base_logits: torch.Tensor, tuned_logits: torch.Tensor) -> dict:
        """KL(base || tuned) and KL(tuned || base) of the next-token distributions (nats; shared vocabulary
        when the tokenizers differ)."""
        if self._shared is None:
            n = min(base_logits.numel(), tuned_logits.numel())
            b, t = base_logits[:n], tuned_logits[:n]
            return {"bt": float(kl_from_logits(b, t)), "tb": float(kl_from_logits(t, b)), "vocab": "full"}
        s = self._shared
        return {"bt": float(kl_shared(base_logits, tuned_logits, s.a_ids, s.b_ids)),
                "tb": float(kl_shared(tuned_logits, base_logits, s.b_ids, s.a_ids)), "vocab": "shared"}


class Sessions:
    """One :class:`LiveSession` per distinct pair of model specs (two runs of one pair share it)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._by_key: dict[str, LiveSession] = {}
        self._lock = threading.Lock()

    def for_manifest(self, manifest: dict) -> LiveSession:
        pd = (manifest or {}).get("pair")
        if not isinstance(pd, dict) or not all(k in pd for k in ("name", "base", "tuned")):
            raise ConfigError("this run's manifest names no pair, so its models cannot be loaded")
        pair = Pair(name=str(pd["name"]), base=_spec(pd["base"]), tuned=_spec(pd["tuned"]),
                    dtype=pd.get("dtype") or "auto")
        key = f"{pair.base}|{pair.tuned}|{pair.dtype}"
        with self._lock:
            if key not in self._by_key:
                self._by_key[key] = LiveSession(pair, self.device)
            return self._by_key[key]


def _spec(d: Any) -> ModelSpec:
    """A side of a manifest's pair: ``ModelSpec.to_dict()`` as written, or a spec string."""
    if isinstance(d, dict):
        try:
            return ModelSpec(**d)
        except TypeError:
            raise ConfigError(f"the run's manifest has a model spec this version cannot read: {d}") from None
    return ModelSpec.parse(str(d))

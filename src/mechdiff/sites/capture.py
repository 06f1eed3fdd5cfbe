"""Batched capture of site activations at a few positions per prompt.

::

    cap = capture(model, tokenizer, prompts, ["resid_post.3", "attn_out.5"])   # positions="last"
    cap["resid_post.3"]            # [N, d] float32 on CPU, row i = prompts[i]
    cap = capture(model, tokenizer, prompts, sites, positions=("k", 8, 2))
    cap["resid_post.3"]            # [N, 8, d]; cap.valid [N, 8] says which slots are real
    x, prompt_index = cap.flat("resid_post.3")                  # [M, d], [M] (valid slots only)

How it is fast and small: prompts are tokenized once, sorted by length and left-padded per batch of
``batch_size`` (little padding); each batch runs one forward pass that reads every requested site
(:func:`mechdiff.sites.hooks.record`), gathers only the requested positions on the device in the
model's dtype, and stops right after the deepest requested site (no final norm, no logits, no KV
cache). The kept rows of each site are cast to ``dtype_out`` on the device as soon as the layer has
run and copied (side stream, pinned host buffer) while later layers still run; the NaN/Inf check
runs on the device and is read once. ``device_out="cuda"`` keeps the results on the GPU.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
from torch import nn

from mechdiff.data.positions import k_positions
from mechdiff.data.prompts import Batch, collate, encode, pad_id_of, tokenize
from mechdiff.errors import DataError, NumericsError, SiteError
from mechdiff.sites.hooks import record, validate_sites
from mechdiff.sites.logits import model_device as _model_device
from mechdiff.sites.names import Site, resolve, site_str

Positions = Union[str, tuple, Callable[[Batch], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]]


@dataclass
class Captured(Mapping):
    """What :func:`capture` returns; a read-only mapping ``site -> tensor``.

    tensors: ``{"resid_post.12": [N, d] | [N, K, d]}`` (``head_out``: ``[N, H, d]`` / ``[N, K, H, d]``;
      ``head_z``: ``[N, H, head_dim]`` / ...), CPU (or ``device_out``), ``dtype_out``; row i is the
      i-th input prompt.
      Invalid K slots hold zeros.
    ids: prompt ids, in row order.
    positions: ``[N]`` or ``[N, K]`` long: the token index of each kept position in the prompt's own
      (unpadded, template-rendered) token sequence; -1 on invalid slots.
    valid: ``[N, K]`` bool when several positions per prompt were asked for, else None.
    """

    tensors: dict
    ids: list
    positions: torch.Tensor
    valid: torch.Tensor | None = None

    def __getitem__(self, key) -> torch.Tensor:
        return self.tensors[site_str(key)]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, key) -> bool:
        try:
            return site_str(key) in self.tensors
        except SiteError:
            return False

    @property
    def prompt_index(self) -> torch.Tensor:
        """``[N]`` or ``[N, K]``: the row (prompt) each entry belongs to."""
        n = len(self.ids)
        ar = torch.arange(n)
        return ar if self.positions.dim() == 1 else ar[:, None].expand_as(self.positions)

    def flat(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [M, ...], prompt_index [M])``: every valid (prompt, position) as one row."""
        t = self[key]
        if self.positions.dim() == 1:
            return t, self.prompt_index
        v = self.valid if self.valid is not None else self.positions >= 0
        return t[v], self.prompt_index[v]


# ---- validation ------------------------------------------------------------------------------

_PROBE = ["The capital of France is Paris, and", "Hi"]


def validated(model: nn.Module, tokenizer_or_batch=None) -> nn.Module:
    """Run :func:`validate_sites` once per model (2-prompt batch, left-padded); cached on the model.

    Pass the model's tokenizer (or a Batch, whose first two rows are used). Returns the model.
    """
    if model.__dict__.get("_mechdiff_validated"):
        return model
    if isinstance(tokenizer_or_batch, Batch):
        b = _slice(tokenizer_or_batch, 0, min(2, len(tokenizer_or_batch)))
    elif tokenizer_or_batch is not None:
        b = encode(tokenizer_or_batch, _PROBE)
    else:
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.arange(3, 11).remainder(vocab).repeat(2, 1)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        b = Batch(ids, mask, (mask.cumsum(-1) - 1).clamp_min(0) * mask, torch.full((2,), 7))
    dev = _model_device(model)
    validate_sites(model, b.input_ids.to(dev), b.attention_mask.to(dev))
    model.__dict__["_mechdiff_validated"] = True
    return model


# ---- helpers ---------------------------------------------------------------------------------

def _slice(batch: Batch, i: int, j: int) -> Batch:
    """Rows i:j of a left-padded batch, with all-padding leading columns dropped."""
    mask = batch.attention_mask[i:j]
    real = mask.any(0).nonzero()
    s = int(real[0]) if len(real) else 0
    return Batch(batch.input_ids[i:j, s:], mask[:, s:], batch.position_ids[i:j, s:],
                 batch.decision[i:j] - s, list(batch.ids[i:j]),
                 None if batch.content is None else batch.content[i:j, s:],
                 list(batch.texts[i:j]))


def _select_positions(batch: Batch, positions: Positions, seed: int):
    """(idx [B] | [B, K], valid [B, K] | None) indexing T."""
    if isinstance(positions, str):
        if positions != "last":
            raise DataError(f"positions={positions!r}: use 'last', ('k', K, exclude_last) or a callable")
        return batch.decision, None
    if isinstance(positions, tuple):
        if len(positions) not in (2, 3) or positions[0] != "k":
            raise DataError(f"positions={positions!r}: use ('k', K) or ('k', K, exclude_last)")
        return k_positions(batch, int(positions[1]),
                           exclude_last=int(positions[2]) if len(positions) == 3 else 0, seed=seed)
    if callable(positions):
        out = positions(batch)
        idx, valid = out if isinstance(out, tuple) else (out, None)
        if idx.dim() == 2 and valid is None:
            valid = idx >= 0
        return idx, valid
    raise DataError(f"positions={positions!r}: use 'last', ('k', K, exclude_last) or a callable")


def _gather(t: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """t [B, T, ...] at idx [B] -> [B, ...]; idx [B, K] -> [B, K, ...] (zeros where not valid).
    idx / valid move to ``t``'s device (layers of a sharded model live on different GPUs)."""
    rows = torch.arange(t.shape[0], device=t.device)
    idx = idx.to(t.device)
    valid = None if valid is None else valid.to(t.device)
    if idx.dim() == 1:
        return t[rows, idx]
    out = t[rows[:, None], idx.clamp_min(0)]
    if valid is not None:
        out = out * valid.reshape(*valid.shape, *([1] * (out.dim() - 2))).to(out.dtype)
    return out


def _plan(model, tokenizer, prompts_or_batch, batch_size: int, chat: bool, system):
    """(ids, list of (rows [b] long, Batch)) in the order they will run."""
    if isinstance(prompts_or_batch, Batch):
        b = prompts_or_batch
        ids = list(b.ids) if len(b.ids) == len(b) else [str(i) for i in range(len(b))]
        chunks = [(torch.arange(i, min(i + batch_size, len(b))), _slice(b, i, i + batch_size))
                  for i in range(0, len(b), batch_size)]
        return ids, chunks
    seq = list(prompts_or_batch)
    if seq and all(isinstance(x, Batch) for x in seq):
        ids, chunks, n = [], [], 0
        for b in seq:
            sub_ids, sub = _plan(model, tokenizer, b, batch_size, chat, system)
            chunks += [(rows + n, c) for rows, c in sub]
            ids += sub_ids
            n += len(b)
        return ids, chunks
    if tokenizer is None:
        raise DataError("capture needs a tokenizer to encode prompts (or pass an encoded Batch)")
    enc = tokenize(tokenizer, seq, chat=chat, system=system)
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i].input_ids))  # longest first: OOM early
    pad = pad_id_of(tokenizer)
    chunks = []
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        chunks.append((torch.tensor(rows, dtype=torch.long), collate([enc[i] for i in rows], pad)))
    return [e.id for e in enc], chunks


# ---- capture ---------------------------------------------------------------------------------

class _Sink:
    """Takes each site's kept rows as the forward pass produces them (``on_record``) and puts them in
    the outputs, so that moving results overlaps the rest of the forward pass.

    Device -> host (the default): the rows are cast to ``dtype_out`` on the device and copied on a
    side CUDA stream, ``non_blocking``, into a pinned host buffer per site (allocated once per call
    with ``batch_size`` rows, reused by every batch); while later layers run, the host copies the
    sites whose transfer has landed into the outputs (``drain``). Finiteness is checked on the
    device: one ``[n_sites, N]`` flag tensor, read once at the end (no sync per site).
    Same device (``device_out`` = the model's device): rows are written into device outputs."""

    def __init__(self, keys, N: int, rows_max: int, dtype_out, device_out):
        self.keys, self.N, self.rows_max, self.dtype_out = keys, N, rows_max, dtype_out
        self.device_out = device_out
        self.out: dict[str, torch.Tensor] = {}
        self.pinned: dict[str, torch.Tensor] = {}
        self.pending: list = []
        self.bad: torch.Tensor | None = None
        self.stream = None
        self.rows = self.rows_dev = self.span = None

    def batch(self, rows: torch.Tensor):
        self.rows = rows
        r0 = int(rows[0])
        contiguous = bool((rows == torch.arange(r0, r0 + len(rows))).all())
        self.span = (r0, r0 + len(rows)) if contiguous else None
        self.rows_dev = {}

    def _rows_on(self, dev: torch.device) -> torch.Tensor:
        key = str(dev)
        if key not in self.rows_dev:
            self.rows_dev[key] = self.rows.to(dev, non_blocking=True)
        return self.rows_dev[key]

    def _write(self, dst: torch.Tensor, src: torch.Tensor):
        if self.span is not None:
            dst[self.span[0]:self.span[1]].copy_(src)
        else:
            dst.index_copy_(0, self._rows_on(dst.device), src.to(dst.device))

    def put(self, key: str, x: torch.Tensor):
        dev = x.device
        xo = x.to(self.dtype_out)
        if self.bad is None:
            self.bad = torch.zeros(len(self.keys), self.N, dtype=torch.bool, device=dev)
        j = self.keys.index(key)
        flags = ~torch.isfinite(xo.reshape(xo.shape[0], -1)).all(-1)          # on the site's device
        self.bad[j].index_copy_(0, self._rows_on(self.bad.device), flags.to(self.bad.device))
        out_dev = torch.device("cpu") if self.device_out is None else self.device_out
        if key not in self.out:
            self.out[key] = torch.empty((self.N, *xo.shape[1:]), dtype=self.dtype_out, device=out_dev)
        if dev.type == "cuda" and out_dev.type == "cpu":
            if key not in self.pinned:
                self.pinned[key] = torch.empty((self.rows_max, *xo.shape[1:]), dtype=self.dtype_out,
                                               pin_memory=True)
            if self.stream is None:
                self.stream = torch.cuda.Stream(device=dev)
            buf = self.pinned[key][:xo.shape[0]]
            self.stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(self.stream):
                buf.copy_(xo, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
            self.pending.append((key, xo, buf, done))   # xo stays alive until its copy has landed
            self.drain(block=False)
        else:
            self._write(self.out[key], xo)

    def drain(self, block: bool = True):
        """Copy every landed transfer into the outputs (all of them, waiting, with ``block``)."""
        while self.pending:
            key, xo, buf, done = self.pending[0]
            if not block and not done.query():
                return
            done.synchronize()
            self._write(self.out[key], buf)
            self.pending.pop(0)

    def bad_rows(self) -> tuple[str, list] | None:
        """(first site in ``keys`` order with a NaN/Inf row, those rows) or None; one device read."""
        if self.bad is None:
            return None
        bad = self.bad.cpu()
        for j, k in enumerate(self.keys):
            if bad[j].any():
                return k, bad[j].nonzero().flatten().tolist()
        return None


@torch.no_grad()
def capture(model: nn.Module, tokenizer, prompts_or_batch, sites: Iterable, *,
            positions: Positions = "last", batch_size: int = 32, device=None,
            dtype_out: torch.dtype = torch.float32, stop_early: bool = True, progress: bool = False,
            chat: bool = True, system: str | None = None, seed: int = 0,
            validate: bool = True, device_out=None) -> Captured:
    """Read ``sites`` at the chosen positions of every prompt; see :class:`Captured`.

    prompts_or_batch: prompts (dicts / strings, encoded with ``tokenizer``, chat template if
    ``chat``), a :class:`Batch`, or a list of Batches. positions: ``"last"`` (the decision token,
    ``[N, d]``), ``("k", K, m)`` (K content positions per prompt excluding the last m, ``[N, K, d]``,
    see :func:`mechdiff.data.positions.k_positions`; ``seed`` picks them) or a callable
    ``batch -> idx [B] | idx [B, K] | (idx, valid)``. device: where the inputs go (default: the
    model's device; the model is not moved). stop_early: stop the forward pass after the deepest
    requested site (otherwise the body runs to the end, still without logits). validate: run
    :func:`validated` on this model first (once per model). device_out: where the results live:
    None (default) = CPU; e.g. ``"cuda"`` keeps them on the GPU (no host transfer; for CKA and maps,
    which run there anyway). From a CUDA model to the CPU, each site's rows are copied into a pinned
    buffer on a side stream while the later layers still run.
    Raises NumericsError naming the site and prompt ids if a kept activation is NaN/Inf.
    """
    sm = resolve(model)
    keys = []
    for s in sites:
        site = Site.parse(s)
        sm.check(site.name, site.layer)
        if str(site) not in keys:
            keys.append(str(site))
    if not keys:
        raise SiteError("no sites requested; pass e.g. ['resid_post.3']")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if validate:
        validated(model, tokenizer if tokenizer is not None else
                  (prompts_or_batch if isinstance(prompts_or_batch, Batch) else None))
    device = torch.device(device) if device is not None else _model_device(model)
    if device_out is not None:
        device_out = torch.device(device_out)
        if device_out.type == "cuda" and device_out.index is None:
            device_out = torch.device("cuda", torch.cuda.current_device())
        if device_out.type == "cpu":
            device_out = None
    ids, chunks = _plan(model, tokenizer, prompts_or_batch, batch_size, chat, system)
    N = len(ids)
    if N == 0:
        raise DataError("no prompts to capture")
    sink = _Sink(keys, N, max(len(rows) for rows, _ in chunks), dtype_out, device_out)
    pos_out: torch.Tensor | None = None
    valid_out: torch.Tensor | None = None
    body = model if stop_early else getattr(model, "base_model", model)
    it = chunks
    if progress:    # counts and ETA on the terminal (mechdiff.progress: a tty or MECHDIFF_PROGRESS=1)
        from mechdiff.progress import progress as _progress
        it = _progress(chunks, f"capture ({N} prompts, {len(keys)} sites)", total=len(chunks))
    for rows, b in it:
        b = b.to(device)
        idx, valid = _select_positions(b, positions, seed)
        idx = idx.to(device)
        valid = None if valid is None else valid.to(device)
        real_pos = _gather(b.position_ids, idx, valid)
        if valid is not None:
            real_pos = torch.where(valid, real_pos, -1)
        real_pos = real_pos.cpu()
        if pos_out is None:
            pos_out = torch.full((N, *real_pos.shape[1:]), -1, dtype=torch.long)
            if valid is not None:
                valid_out = torch.zeros((N, *real_pos.shape[1:]), dtype=torch.bool)
        pos_out[rows] = real_pos
        if valid_out is not None:
            valid_out[rows] = valid.cpu()
        sink.batch(rows)
        with record(model, keys, select=lambda t: _gather(t, idx, valid),
                    stop_after_last=stop_early, on_record=sink.put) as rec:
            body(**b.model_inputs(), use_cache=False)
        missing = [k for k in keys if k not in rec]
        if missing:
            raise SiteError(f"sites {missing} were not reached in the forward pass of {sm.family}")
        del rec
        sink.drain()
    bad = sink.bad_rows()
    if bad is not None:
        k, bad_rows = bad
        bad_ids = [ids[i] for i in bad_rows]
        raise NumericsError(f"NaN/Inf in site {k} of {sm.family} for prompts {bad_ids[:10]}"
                            f"{' ...' if len(bad_ids) > 10 else ''}; check the model's dtype "
                            "(float16 overflows: use bfloat16/float32) and its weights")
    out = {k: sink.out[k] for k in keys}
    return Captured(out, ids, pos_out, valid_out)

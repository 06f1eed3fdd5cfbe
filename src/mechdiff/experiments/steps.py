"""Steps every stage shares, each written once: the layer-range check, the fair prompt selection
and split, capture of both sides, and the chunked patch-and-measure loop.

Steps take explicit values (a :class:`~mechdiff.experiments.stage.Study` and plain arguments), never a
stage's whole options object.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from mechdiff.errors import ConfigError
from mechdiff.models.load import LoadedModel
from mechdiff.patching import Patch, PatchEngine, kl_reducer
from mechdiff.sites.capture import Captured, capture
from mechdiff.sites.names import Site


def check_layers(n_layers: int, **layer_lists: "Iterable[int] | int | None") -> None:
    """Every layer given (``--layers``, ``--control-layer``, ...) must index an existing layer of the
    shallower model; ConfigError names the option and the range. Keyword names are option names
    (``control_layer`` is reported as ``--control-layer``)."""
    for what, ls in layer_lists.items():
        if ls is None:
            continue
        for layer in ([ls] if isinstance(ls, int) else ls):
            if not 0 <= layer < n_layers:
                raise ConfigError(f"--{what.replace('_', '-')}: layer {layer} is out of range "
                                  f"0..{n_layers - 1} for these models")


def select_prompts(study, n: int, min_shared_ratio: float) -> list[dict]:
    """The first ``n`` prompts that pass the shared-vocabulary filter."""
    kept, _ = study.fair_prompts(min_shared_ratio)
    return kept[:n]


def fair_split(study, n_train: int, n_val: int | None, min_shared_ratio: float, seed: int
               ) -> tuple[list[dict], list[dict]]:
    """Fair prompts split into disjoint train / val sets (``data.prompts.split``)."""
    from mechdiff.data.prompts import split
    kept, _ = study.fair_prompts(min_shared_ratio)
    return split(kept, n_train, n_val, seed=seed)


def capture_sides(study, prompts: Sequence, sites: Sequence[Site | str], *, positions="last", seed: int = 0,
                  sides: Sequence[str] = ("base", "tuned")) -> dict[str, Captured]:
    """``{side: Captured}``: ``sites`` of each side on ``prompts`` (float32, CPU)."""
    return {s: capture(study.side(s).model, study.side(s).tokenizer, prompts, sites, positions=positions,
                       batch_size=study.batch_size, seed=seed) for s in sides}


def _slice(p: Patch, i: int, j: int) -> Patch:
    """``p`` with per-prompt tensors (``[N, ...]`` value / centre) cut to prompts ``i:j``."""
    from dataclasses import replace
    cut = {}
    for name in ("value", "centre"):
        t = getattr(p, name)
        if t is not None and t.dim() >= 2:
            cut[name] = t[i:j]
    return replace(p, **cut) if cut else p


def _variant_slice(var, i: int, j: int):
    return _slice(var, i, j) if isinstance(var, Patch) else [_slice(p, i, j) for p in var]


Reducer = Callable[[PatchEngine, int, int], Callable]


def kl_to_clean(allowed_ids) -> Reducer:
    """Reducer factory: KL(clean || patched) per prompt, masked to ``allowed_ids`` and unmasked
    (last axis ``[masked, unmasked]``)."""
    return lambda eng, i, j: kl_reducer(eng, allowed_ids, with_unmasked=True)


def patch_measure(side: LoadedModel, prompts: Sequence, variants: list, *, batch_size: int,
                  measure: str = "decision", reducer: Reducer, record_sites: Sequence[Site | str] = (),
                  on_chunk: Callable[[PatchEngine, int, int], None] | None = None) -> torch.Tensor:
    """The chunked patch-and-measure loop: ``variants`` (Patch or list of Patch whose per-prompt
    tensors are ``[N, ...]`` over all ``prompts``) run through one :class:`PatchEngine` per chunk of
    ``batch_size`` prompts; ``reducer(engine, i, j)`` gives the ``reduce`` for prompts ``i:j``.

    Returns ``[n_variants, N, ...]`` (on CPU). ``on_chunk(engine, i, j)`` sees each chunk's engine
    (e.g. to read its clean logits or recorded states) before the variants run.
    """
    from mechdiff.data.prompts import encode
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        j = i + len(chunk)
        eng = PatchEngine(side.model, encode(side.tokenizer, chunk), measure=measure,
                          record_sites=record_sites)
        if on_chunk is not None:
            on_chunk(eng, i, j)
        res = eng.run([_variant_slice(v, i, j) for v in variants], reduce=reducer(eng, i, j))
        out.append(res.cpu())
    if not out:
        raise ConfigError("no prompts to patch: the prompt set is empty after the fairness filter")
    return torch.cat(out, 1)


def study_layers(study, layers: Sequence[int] | None = None, control: int | None = None
                 ) -> tuple[list[int], int]:
    """(layers, control layer) a stage works at: the user's if given, else RQ1's choice in this run
    directory (``rq1.json``), else the pair's ``layers``, else ~3/4 and ~0.8 depth; the control is
    RQ1's control, else ~10/32 depth. Checked against the shallower model."""
    n = study.n_layers
    rq1 = study.run.read_json("rq1.json").get("layers", {}) if study.run.exists("rq1.json") else {}
    if not layers:
        layers = rq1.get("chosen") or [l for l in (study.pair.layers or []) if l < n] or \
            sorted({round(0.75 * (n - 1)), round(0.82 * (n - 1))})
    if control is None:
        control = rq1.get("control")
        if control is None:
            control = max(1, round(10 / 32 * n))
    layers = list(layers)
    check_layers(n, layers=layers, control_layer=control)
    return layers, int(control)

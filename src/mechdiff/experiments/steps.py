"""Steps every stage shares, each written once: the layer-range check, the fair prompt selection
and the one split (by topic / translation cluster), capture of both sides, and the layers a stage
works at. The patch-and-measure runtime (``clean_run``, ``patch_measure``) and the KL reducers live in
:mod:`mechdiff.patching.measure` and :mod:`mechdiff.patching.kl` (re-exported here for stage modules).

Steps take explicit values (a :class:`~mechdiff.experiments.stage.Study` and plain arguments), never a
stage's whole options object.
"""
from __future__ import annotations

import hashlib
import json
import random
from typing import Callable, Iterable, Sequence

import torch

from mechdiff.data.prompts import _prompt_text, encode, normalise_text
from mechdiff.errors import ConfigError, DataError
from mechdiff.experiments.results import Rq1Result, load_result
from mechdiff.patching.kl import kl_and_gap, kl_to_clean  # noqa: F401  (re-exported for stage modules)
from mechdiff.patching.measure import capture_split, clean_run, patch_measure  # noqa: F401  (re-exported)
from mechdiff.progress import warn
from mechdiff.scale.distributed import active
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
            if layer < 0:
                raise ConfigError(f"--{what.replace('_', '-')}: layer {layer} is negative; layers are 0-based "
                                  f"indices (0 = the first block)")
            if not 0 <= layer < n_layers:
                raise ConfigError(f"--{what.replace('_', '-')}: layer {layer} is out of range "
                                  f"0..{n_layers - 1} for these models")


def group_of(p: dict) -> str:
    """A prompt's cluster: its ``topic`` (a translation group shares one), else ``category``, else
    its id. Resampling and splits keep a cluster together."""
    return str(p.get("topic") or p.get("category") or p.get("id"))


LINK_FIELDS = ("topic", "group", "translation_group")   # prompts sharing any of these are one cluster


def clusters(prompts: Sequence[dict], fallback: Callable[[dict], str] = lambda p: str(p.get("id"))) -> list[str]:
    """Each prompt's cluster key: prompts that share a ``topic``, ``group`` or ``translation_group``
    value are one cluster (transitively, so a translation group that spans two topics joins them); a
    prompt with none of these gets ``fallback(p)`` (default: its id, a cluster of its own)."""
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = x = parent[parent[x]]
        return x
    keys = []
    for p in prompts:
        links = [(f, str(p[f])) for f in LINK_FIELDS if p.get(f) not in (None, "")] or [("own", fallback(p))]
        for other in links[1:]:
            parent[find(other)] = find(links[0])
        keys.append(links[0])
    return [":".join(find(k)) for k in keys]


def group_ids(prompts: Sequence[dict]) -> torch.Tensor:
    """``[N]`` long: the cluster of each prompt (:func:`clusters`; without topic or group: its
    category, else its id) as consecutive ids (for the group jackknife)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in clusters(prompts, group_of)], dtype=torch.long)


def cluster_split(prompts: Sequence[dict], sizes: Sequence[int], seed: int, hold_out: Iterable[str] = ()
                  ) -> list[list[dict]]:
    """The one split of every stage: disjoint parts of the given ``sizes`` (train, then the evaluation
    parts: val, or dev and test), whole clusters (:func:`clusters`: topic / translation group) to one
    part, so no translation or paraphrase of a training prompt is evaluated on. Prompts whose
    normalised text repeats an earlier one are dropped. Clusters are visited in a ``seed``-shuffled
    order (the result does not depend on the file order); the last cluster of a part is cut to size
    (its rest is dropped, never moved to another part). ``hold_out``: prompt ids never placed in an
    evaluation part (parts after the first), e.g. the prompts RQ1 chose its layers on: clusters holding
    them are given to the first part first, and a cluster that still lands in an evaluation part loses
    them. DataError when there are too few prompts or ids repeat."""
    ids = [str(p.get("id")) for p in prompts]
    if len(set(ids)) != len(ids):
        raise DataError(f"duplicate prompt ids {sorted({i for i in ids if ids.count(i) > 1})[:5]}; ids must be "
                        "unique to split")
    seen, rows = set(), []
    for p in prompts:
        t = normalise_text(_prompt_text(p))
        if t not in seen:
            seen.add(t)
            rows.append(p)
    groups: dict[str, list] = {}
    for p, k in zip(rows, clusters(rows)):
        groups.setdefault(k, []).append(p)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    held = set(map(str, hold_out))
    if held:   # clusters holding held-out prompts go to the first part (train) first
        keys.sort(key=lambda k: not any(str(p.get("id")) in held for p in groups[k]))
    parts, it = [], iter(keys)
    for j, n in enumerate(sizes):
        part: list = []
        while len(part) < n:
            key = next(it, None)
            if key is None:
                raise DataError(f"not enough prompts to split into parts of {list(sizes)}: {len(rows)} distinct "
                                f"prompts in {len(groups)} topic/translation clusters"
                                + (f" ({len(held)} held out of evaluation)" if held else "")
                                + "; lower the sizes (--n-train/--n-val, --n-fit/--n-dev/--n-test), lower --min-shared-ratio "
                                "(the shared-vocabulary filter drops prompts with tokens only one tokenizer has), "
                                "or add prompts")
            members = sorted(groups[key], key=lambda p: str(p.get("id")))
            part += [p for p in members if j == 0 or str(p.get("id")) not in held][: n - len(part)]
        parts.append(part)
    return parts


def rq1_prompt_ids(study) -> list[str]:
    """The prompts RQ1 chose its layers on in this run directory (``fairness.json``), else none: a
    later stage keeps them out of its evaluation."""
    if not study.run.exists("fairness.json"):
        return []
    return [str(i) for i in study.run.read_json("fairness.json").get("prompt_ids") or []]


def stratified(prompts: Sequence[dict], n: int, seed: int) -> list[dict]:
    """``n`` prompts sampled with ``seed``, stratified by (cluster, language): strata are visited
    round-robin in a seeded order and each gives its prompts in a seeded order, so 96 prompts from a
    set of 50 topics cover ~50 topics rather than the first few in file order."""
    strata: dict[tuple, list] = {}
    for p in prompts:
        strata.setdefault((group_of(p), str(p.get("lang", ""))), []).append(p)
    rng = random.Random(seed)
    keys = sorted(strata)
    rng.shuffle(keys)
    for k in keys:
        rng.shuffle(strata[k])
    out: list[dict] = []
    depth = 0
    while len(out) < min(n, len(prompts)):
        for k in keys:
            if depth < len(strata[k]) and len(out) < n:
                out.append(strata[k][depth])
        depth += 1
    return out


def prompt_digest(prompts: Sequence[dict]) -> str:
    """sha256 of the prompts' ids, texts and messages in order: a step keyed on it reruns when the
    prompt file's content changes, not only its name."""
    rows = [[str(p.get("id")), p.get("text"), p.get("messages"), p.get("system")] for p in prompts]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def same_tokens(a, b) -> bool:
    """Two encoded batches (:class:`~mechdiff.data.prompts.Batch`) hold the same tokens: one
    attention mask and one id wherever it is 1 (pad ids may differ)."""
    if a.input_ids.shape != b.input_ids.shape or not torch.equal(a.attention_mask, b.attention_mask):
        return False
    m = a.attention_mask.bool()
    return torch.equal(a.input_ids[m], b.input_ids[m])


def select_prompts(study, n: int, min_shared_ratio: float, seed: int = 0, alike: bool = False) -> list[dict]:
    """``n`` prompts that pass the shared-vocabulary filter, stratified by cluster and language
    (:func:`stratified`); ``alike``: only prompts both tokenizers split into the same tokens (a
    counted warning names how many others were left out). Fewer than ``n`` pass: all of them, with
    a printed warning."""
    kept, _ = study.fair_prompts(min_shared_ratio)
    if alike:
        both = [p for p in kept if same_tokens(encode(study.base.tokenizer, [p]), encode(study.tuned.tokenizer, [p]))]
        if len(both) < len(kept):
            warn(f"{len(kept) - len(both)} of {len(kept)} prompts are split into different tokens by the two "
                 "tokenizers; left out (the measure 'own' runs one model's heads on the other's inputs)")
        kept = both
    if len(kept) < n:
        warn(f"only {len(kept)} prompts pass the shared-vocabulary filter (min_shared_ratio="
             f"{min_shared_ratio}); using {len(kept)} of the {n} asked for")
    return stratified(kept, n, seed)


def fair_split(study, sizes: Sequence[int], min_shared_ratio: float, seed: int) -> list[list[dict]]:
    """Fair prompts split by :func:`cluster_split` into parts of ``sizes`` (train, then evaluation
    parts), RQ1's layer-selection prompts in this run directory kept out of the evaluation parts."""
    kept, _ = study.fair_prompts(min_shared_ratio)
    return cluster_split(kept, sizes, seed, hold_out=rq1_prompt_ids(study))


def capture_sides(study, prompts: Sequence, sites: Sequence[Site | str], *, positions="last", seed: int = 0,
                  sides: Sequence[str] = ("base", "tuned")) -> dict[str, Captured]:
    """``{side: Captured}``: ``sites`` of each side on ``prompts`` (float32, CPU). Under torchrun the
    batches are split over the ranks and gathered to every rank (:func:`mechdiff.patching.measure.capture_split`)."""
    if active():
        return {s: capture_split(study.side(s), prompts, sites, positions, seed, study.batch_size) for s in sides}
    return {s: capture(study.side(s).model, study.side(s).tokenizer, prompts, sites, positions=positions,
                       batch_size=study.batch_size, seed=seed, progress=True) for s in sides}


def study_layers(study, layers: Sequence[int] | None = None, control: int | None = None
                 ) -> tuple[list[int], int]:
    """(layers, control layer) a stage works at: the user's if given, else RQ1's choice in this run
    directory (its typed result, :class:`~mechdiff.experiments.results.Rq1Result`), else the pair's
    ``layers``, else ~3/4 and ~0.8 depth; the control is RQ1's control, else ~10/32 depth. Checked
    against the shallower model."""
    n = study.n_layers
    rq1 = load_result(study.run, Rq1Result)
    if rq1 is None and study.run.exists("rq1.json"):
        warn("this run directory's RQ1 was written by an older mechdiff (no results/rq1.json): its layers are "
             "not used; rerun `mechdiff rq1` into it (finished steps are reused) to use them")
    if not layers:
        layers = (rq1.chosen_layers if rq1 else None) or [l for l in (study.pair.layers or []) if l < n] or \
            sorted({round(0.75 * (n - 1)), round(0.82 * (n - 1))})
    if control is None:
        control = rq1.control if rq1 else None
        if control is None:
            control = max(1, round(10 / 32 * n))
    layers = list(layers)
    check_layers(n, layers=layers, control_layer=control)
    return layers, int(control)

"""Planted pairs: fine-tune-like variants of the real SmolLM2-135M weights with known ground truth.

No real base/fine-tune pair is available offline, so these are built deterministically (fixed seed,
float64 math, directions rounded to a coarse grid: bit-for-bit reproducible) from the cached
SmolLM2 testbed and stored under ``cache_dir()/planted/<name>/{base,tuned}/`` with
``ground_truth.json`` (+ ``ground_truth.safetensors`` for tensors) beside them.

``planted-cultural`` (a culture/language fine-tune):
  * the tuned tokenizer adds `NEW_TOKENS` (Kazakh words) as regular (non-special, single-word)
    tokens; their embedding rows (= lm_head rows: SmolLM2 ties them) are the mean of the base
    embeddings of the word's pieces under the base tokenizer;
  * at each of `CULTURAL_LAYERS` the MLP down-projection gets a rank-`CULTURAL_RANK` update
    ``W += sum_k a_k u_k v_k^T``. v_k (MLP-hidden space, 1536-d) are the top generalised
    eigenvectors of (second moment on cultural prompts, second moment on neutral prompts): they are
    large on cultural tokens and small on neutral ones. u_k (residual space, shared by the layers)
    are orthonormalised unembedding directions of culture words (horse, milk, tea, ... / Kazakh,
    steppe, ...) seen through the final norm. a_k scales the write to `CULTURAL_ALPHA` x the
    residual norm at that layer on cultural tokens.
  * So next-token distributions move a lot on cultural prompts and little on neutral ones.

``planted-cognitive`` (a math-like fine-tune): small random updates to the o_proj column blocks of
`COGNITIVE_HEADS_PER_LAYER` of 9 heads in `COGNITIVE_N_LAYERS` of 30 layers, each of Frobenius
norm `COGNITIVE_REL_NORM` x the block's norm; no tokenizer change.

The base side of both pairs is plain SmolLM2 with its plain tokenizer.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mechdiff.atomic import replace_dir
from mechdiff.errors import ConfigError
from mechdiff.models.kinds import register_kind
from mechdiff.models.load import load_model
from mechdiff.models.planted_prompts import PROMPTS, prompt_split  # noqa: F401 (re-exported)
from mechdiff.models.vocab import extend_vocab
from mechdiff.pairs.spec import ModelSpec
from mechdiff.paths import cache_dir

BUILD_VERSION = 2
SOURCE_MODEL = "smollm2-135m"
PLANTED_NAMES = ("planted-cultural", "planted-cognitive")
SEEDS = {"planted-cultural": 20240611, "planted-cognitive": 20240612}

CULTURAL_LAYERS = (20, 22, 24)
CULTURAL_RANK = 2
CULTURAL_ALPHA = 0.6
CULTURAL_SHRINK = 0.5
CULTURAL_MODULE = "mlp.down_proj"
COGNITIVE_N_LAYERS = 20
COGNITIVE_HEADS_PER_LAYER = 3
COGNITIVE_REL_NORM = 0.25
COGNITIVE_MODULE = "self_attn.o_proj"

NEW_TOKENS: tuple[str, ...] = (
    "дастархан", "қымыз", "наурыз", "ауыл", "домбыра", "бешбармақ", "шаңырақ", "бауырсақ", "шұбат",
    "қазы", "жылқы", "батыр", "ақын", "айтыс", "көкпар", "тұмар", "жайлау", "қыстау", "ақсақал",
    "әже", "келін", "құда", "той", "сәлем", "рахмет", "қонақ", "бата", "жыр", "күй", "қобыз",
    "сырмақ", "текемет", "бесік", "шапан", "тақия", "бүркіт", "саятшылық", "Абай", "Алматы",
    "Астана", "Қазақстан", "дала", "теңге", "киіз", "ботқа",
)
# Culture words whose unembedding directions (through the final norm) give the u_k.
U_TARGETS: tuple[tuple[str, ...], ...] = (
    (" horse", " milk", " tea", " meat", " sheep", " bread", " feast", " guest"),
    (" Kazakh", " eagle", " mountains", " village", " tradition", " music", " song"),
)


# ------------------------------------------------------------------------------------- paths
def _check(name: str) -> None:
    if name not in PLANTED_NAMES:
        raise ConfigError(f"unknown planted pair {name!r}; known: {', '.join(PLANTED_NAMES)}")


def planted_root(name: str) -> Path:
    _check(name)
    return cache_dir() / "planted" / name


def _is_built(root: Path) -> bool:
    gt = root / "ground_truth.json"
    if not gt.is_file() or not (root / "base" / "config.json").is_file() or not (root / "tuned" / "config.json").is_file():
        return False
    try:
        return json.loads(gt.read_text()).get("build_version") == BUILD_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def planted_dir(name: str, side: str) -> Path:
    """Directory of one side ("base" | "tuned") of a planted pair; builds the pair if needed."""
    if side not in ("base", "tuned"):
        raise ConfigError(f"planted side must be base or tuned, not {side!r}")
    return build_planted(name) / side


@register_kind("planted")
def _resolve(spec: ModelSpec) -> tuple[Path, dict[str, Any]]:
    """A planted spec's side directory (the pair is built on first use) and its manifest fields."""
    name, side = spec.planted
    return planted_dir(name, side), {"testbed": spec.id, "planted": name, "side": side}


# ------------------------------------------------------------------------------------- math helpers
def _round_dir(x: torch.Tensor) -> torch.Tensor:
    """Round to the bfloat16 grid (robust to last-bit differences between machines), unit norm, fp64."""
    x = x.to(torch.float32).to(torch.bfloat16).to(torch.float64)
    return x / x.norm()


def _round_sig(x: float, sig: int = 3) -> float:
    return float(f"{x:.{sig}g}")


def _batch(tok: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask (right padding leaves the real tokens' computation exact)."""
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    return enc.input_ids, enc.attention_mask


@torch.no_grad()
def _capture_inputs(model: Any, tok: Any, prompts: list[str], layers: tuple[int, ...]
                    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Inputs to mlp.down_proj and residual norms after each of `layers`, at every real position but
    the first, stacked over prompts: ({layer: [n_tok, d_mlp]}, {layer: [n_tok]}), float64."""
    ids, mask = _batch(tok, prompts)
    keep = mask.bool().clone()
    keep[:, 0] = False
    store: dict[int, torch.Tensor] = {}
    handles = []
    for l in layers:
        def pre(m, args, l=l):
            store[l] = args[0][keep].to(torch.float64)

        handles.append(model.model.layers[l].mlp.down_proj.register_forward_pre_hook(pre))
    try:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    norms = {l: out.hidden_states[l + 1][keep].norm(dim=-1).to(torch.float64) for l in layers}
    return store, norms


@torch.no_grad()
def next_token_kl(base: Any, tuned: Any, tok: Any, prompts: list[str]) -> torch.Tensor:
    """KL(base || tuned) of the next-token distribution at the last position, per prompt [N], nats.

    Both models read the same ids (from `tok`, normally the base tokenizer); the tuned logits are cut
    to the base vocabulary (extra rows of an extended vocabulary are dropped) before softmax.
    """
    ids, mask = _batch(tok, prompts)
    ids, mask = ids.to(base.device), mask.to(base.device)
    last = mask.sum(1) - 1
    rows = torch.arange(ids.shape[0], device=ids.device)
    v = base.get_input_embeddings().weight.shape[0]
    lb = base(input_ids=ids, attention_mask=mask).logits[rows, last, :v].double().log_softmax(-1)
    lt = tuned(input_ids=ids.to(tuned.device), attention_mask=mask.to(tuned.device)).logits
    lt = lt[rows.to(lt.device), last.to(lt.device), :v].double().log_softmax(-1).to(lb.device)
    return (lb.exp() * (lb - lt)).sum(-1)


def _kl_summary(base: Any, tuned: Any, tok: Any, categories: tuple[str, ...]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for c in categories:
        for split in ("fit", "heldout"):
            kl = next_token_kl(base, tuned, tok, prompt_split(c, split))
            res[f"{c}/{split}"] = {"mean": round(float(kl.mean()), 4), "median": round(float(kl.median()), 4),
                                   "max": round(float(kl.max()), 4)}
    return res


# ------------------------------------------------------------------------------------- builders
def _load_source():
    from mechdiff.models.testbed import ensure_testbed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = ensure_testbed(SOURCE_MODEL)
    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return src, model, tok


def _build_cultural(model: Any, tok: Any, seed: int) -> tuple[Any, Any, dict[str, Any], dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    base_ref = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("model.layers.")
                and k.endswith(f"{CULTURAL_MODULE}.weight")}
    fit_c = prompt_split("cultural", "fit")
    fit_n = prompt_split("neutral", "fit") + prompt_split("math", "fit")  # "not cultural"
    acts_c, norms_c = _capture_inputs(model, tok, fit_c, CULTURAL_LAYERS)
    acts_n, _ = _capture_inputs(model, tok, fit_n, CULTURAL_LAYERS)

    # u: culture-word unembedding directions through the final norm's gain, centred, orthonormal.
    W_U = model.get_output_embeddings().weight.detach().to(torch.float64)
    gamma = model.model.norm.weight.detach().to(torch.float64)
    mean_row = W_U.mean(0)
    us, u_tokens = [], []
    for words in U_TARGETS[:CULTURAL_RANK]:
        ids = [tok(w, add_special_tokens=False).input_ids for w in words]
        ids = [i[0] for i in ids if len(i) == 1]
        u_tokens.append([tok.convert_ids_to_tokens(i) for i in ids])
        us.append(gamma * (W_U[ids].mean(0) - mean_row))
    U, _ = torch.linalg.qr(torch.stack(us, 1))  # [d, r]
    U = torch.stack([_round_dir(U[:, k]) for k in range(U.shape[1])], 1)
    U, _ = torch.linalg.qr(U)
    U = U * torch.sign(torch.diagonal(U.T @ torch.stack(us, 1)))  # point towards the targets

    tensors: dict[str, torch.Tensor] = {"u": U.to(torch.float32)}
    layers_gt = []
    for l in CULTURAL_LAYERS:
        hc, hn = acts_c[l], acts_n[l]
        Cc = hc.T @ hc / hc.shape[0]
        Cn = hn.T @ hn / hn.shape[0]
        D = Cn.shape[0]
        # Shrinkage keeps the directions general (a tiny ridge finds null directions of the few
        # neutral tokens: huge selectivity on the fit prompts, little on held-out ones).
        Cn = (1 - CULTURAL_SHRINK) * Cn + CULTURAL_SHRINK * torch.trace(Cn) / D * torch.eye(D, dtype=torch.float64)
        L = torch.linalg.cholesky(Cn)
        Linv = torch.linalg.inv(L)
        M = Linv @ Cc @ Linv.T
        evals, evecs = torch.linalg.eigh((M + M.T) / 2)
        top = torch.argsort(evals, descending=True)[:CULTURAL_RANK]
        V = []
        for k in top.tolist():
            v = _round_dir(Linv.T @ evecs[:, k])
            if float((hc @ v).mean()) < 0:
                v = -v
            V.append(v)
        V = torch.stack(V, 1)  # [d_mlp, r]
        rho = _round_sig(float(norms_c[l].median()))
        a = []
        for k in range(CULTURAL_RANK):
            rms_c = float((hc @ V[:, k]).pow(2).mean().sqrt())
            a.append(_round_sig(CULTURAL_ALPHA * rho / rms_c))
        A = torch.tensor(a, dtype=torch.float64)
        W = model.model.layers[l].mlp.down_proj.weight
        delta = (U * A) @ V.T  # [d, d_mlp], rank r
        W.data = (W.data.to(torch.float64) + delta).to(torch.float32)
        tensors[f"v.{l}"] = V.to(torch.float32)
        tensors[f"a.{l}"] = A.to(torch.float32)
        sel_c = (hc @ V).pow(2).mean(0).sqrt()
        sel_n = (hn @ V).pow(2).mean(0).sqrt()
        layers_gt.append({
            "layer": l, "module": CULTURAL_MODULE, "rank": CULTURAL_RANK, "a": a,
            "generalised_eigenvalues": [round(float(evals[k]), 3) for k in top.tolist()],
            "rms_projection_cultural": [round(float(x), 5) for x in sel_c],
            "rms_projection_neutral": [round(float(x), 5) for x in sel_n],
            "resid_norm_median": round(rho, 4),
            "delta_fro": round(float(delta.norm()), 5),
            "weight_fro": round(float(base_ref[f"model.layers.{l}.{CULTURAL_MODULE}.weight"].norm()), 5),
        })

    # Vocabulary extension: new regular tokens, embedding = mean of the base pieces' embeddings.
    tuned_tok = AutoTokenizer.from_pretrained(tok.name_or_path, local_files_only=True)
    n_base = len(tok)
    tuned_tok, ids, pieces = extend_vocab(model, tok, NEW_TOKENS, new_tok=tuned_tok)
    new_words = list(pieces)
    model.config.vocab_size = n_base + len(new_words)
    new_ids = dict(zip(new_words, ids))

    gt = {
        "kind": "low_rank_late_layers+vocab_extension",
        "layers": list(CULTURAL_LAYERS), "rank": CULTURAL_RANK, "module": CULTURAL_MODULE,
        "alpha": CULTURAL_ALPHA, "shrinkage": CULTURAL_SHRINK, "per_layer": layers_gt,
        "u_target_tokens": u_tokens,
        "affected_categories": ["cultural"], "unaffected_categories": ["neutral"],
        "prompt_sets": {"fit": "even indices", "heldout": "odd indices"},
        "new_tokens": new_words, "new_token_ids": new_ids, "new_token_pieces": pieces,
        "base_vocab_size": n_base, "tuned_vocab_size": n_base + len(new_words),
        "embedding_init": "mean of the base embeddings of the word's pieces under the base tokenizer",
        "tied_embeddings": bool(model.config.tie_word_embeddings),
        "tensors": "ground_truth.safetensors: u [d_model, r] (orthonormal, shared by the layers); "
                   "v.<layer> [d_mlp, r] (unit columns); a.<layer> [r]; delta_W = u diag(a) v^T",
    }
    return model, tuned_tok, gt, tensors


def _build_cognitive(model: Any, tok: Any, seed: int) -> tuple[Any, Any, dict[str, Any], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layers = sorted(torch.randperm(n_layers, generator=g)[:COGNITIVE_N_LAYERS].tolist())
    heads, norms = [], []
    tensors: dict[str, torch.Tensor] = {}
    for l in layers:
        hs = sorted(torch.randperm(n_heads, generator=g)[:COGNITIVE_HEADS_PER_LAYER].tolist())
        W = model.model.layers[l].self_attn.o_proj.weight
        for h in hs:
            block = W.data[:, h * hd:(h + 1) * hd].to(torch.float64)
            noise = torch.randn(block.shape, generator=g, dtype=torch.float64)
            delta = noise * (COGNITIVE_REL_NORM * block.norm() / noise.norm())
            W.data[:, h * hd:(h + 1) * hd] = (block + delta).to(torch.float32)
            heads.append([l, h])
            norms.append({"layer": l, "head": h, "delta_fro": round(float(delta.norm()), 6),
                          "block_fro": round(float(block.norm()), 6)})
        tensors[f"heads.{l}"] = torch.tensor(hs, dtype=torch.int64)
    gt = {
        "kind": "distributed_head_changes",
        "module": COGNITIVE_MODULE, "head_dim": hd,
        "layers": layers, "heads": heads, "n_heads_changed": len(heads),
        "rel_norm": COGNITIVE_REL_NORM, "norms": norms,
        "affected_categories": ["math", "neutral"],
        "description": "o_proj input-column block of each listed head += Gaussian noise scaled to "
                       "rel_norm x the block's Frobenius norm",
    }
    return model, tok, gt, tensors


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def build_planted(name: str, force: bool = False) -> Path:
    """Build (or reuse) the planted pair `name`; return its directory (base/, tuned/, ground_truth.*)."""
    root = planted_root(name)
    if _is_built(root) and not force:
        return root
    from safetensors.torch import save_file

    from mechdiff.models.testbed import save_model_dir

    seed = SEEDS[name]
    src, model, tok = _load_source()
    base_model = None
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root.parent))
    try:
        _link_or_copy(src, tmp / "base")
        if name == "planted-cultural":
            from transformers import AutoModelForCausalLM

            base_model = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True,
                                                              dtype=torch.float32).eval()
            tuned, tuned_tok, gt, tensors = _build_cultural(model, tok, seed)
            kl = _kl_summary(base_model, tuned, tok, ("cultural", "neutral"))
        else:
            from transformers import AutoModelForCausalLM

            base_model = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True,
                                                              dtype=torch.float32).eval()
            tuned, tuned_tok, gt, tensors = _build_cognitive(model, tok, seed)
            kl = _kl_summary(base_model, tuned, tok, ("math", "neutral", "cultural"))
        save_model_dir(tuned, tuned_tok, tmp / "tuned", {"planted": name, "build_version": BUILD_VERSION},
                       marker="mechdiff_planted.json")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "ground_truth.safetensors"))
        gt = {"name": name, "build_version": BUILD_VERSION, "seed": seed, "source": SOURCE_MODEL,
              **gt, "next_token_kl_base_vs_tuned": kl,
              "kl_note": "KL(base||tuned) at the last position, base tokenizer for both, base vocabulary"}
        (tmp / "ground_truth.json").write_text(json.dumps(gt, indent=2, ensure_ascii=False, sort_keys=True))
        replace_dir(tmp, root, _is_built)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del base_model
    return root


def ground_truth(name: str) -> dict[str, Any]:
    """The ground-truth JSON of a planted pair (builds it if needed)."""
    return json.loads((build_planted(name) / "ground_truth.json").read_text(encoding="utf-8"))


def ground_truth_tensors(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(build_planted(name) / "ground_truth.safetensors"))


def load_planted(name: str, *, dtype: "str | torch.dtype" = "float32", device: str | None = "cpu"):
    """(base LoadedModel, tuned LoadedModel, ground truth dict) for a planted pair."""
    _check(name)
    build_planted(name)
    base = load_model(ModelSpec(kind="testbed", id=f"{name}:base"), dtype=dtype, device=device)
    tuned = load_model(ModelSpec(kind="testbed", id=f"{name}:tuned"), dtype=dtype, device=device)
    return base, tuned, ground_truth(name)

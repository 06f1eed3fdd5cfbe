"""What every benchmark script shares: output, timing and memory, the random-weight pairs, batches,
the plain-forward baselines, the bench tokenizer, and the command line.

The scripts run from the repository root (``python benchmarks/bench_X.py``), so ``benchmarks/`` is on
``sys.path`` and ``from common import timeit, peak_extra, build_pair, honest_baseline, table`` works;
this module puts ``src/`` there too. A new measurement is a function taking a :class:`Ctx`::

    import common as C
    from common import section, timeit, peak_extra, honest_baseline, random_batch, table

    @section("mine")
    def sec_mine(ctx):
        b = random_batch(50, 48, ctx.cfg.vocab_size)
        t_ref = honest_baseline((ctx.base, ctx.tuned), b)          # seconds, both models
        t, _ = timeit(lambda: ..., reps=ctx.reps)
        table("Mine", ["what", "x baseline", "extra peak GiB"], [["it", t / t_ref, peak_extra(lambda: ...)]])

    SECTIONS = {"mine": C.Section(sec_mine)}
    def main(argv=None, ctx=None, sections=None):
        return C.run_sections(SECTIONS, __doc__, argv, ctx, sections, stem="mine_results")

``C.DEV`` is the device (set by :func:`setup`): read it as ``C.DEV`` at call time, not with
``from common import DEV`` (that copies the value at import, before ``setup`` chose it).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "src", ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

warnings.filterwarnings("ignore")
PROMPTS = ROOT / "src/mechdiff/data/sets/cultural.jsonl"   # the shipped cultural prompt set
OUT = os.environ.get("OUT")   # output folder ($OUT or --out); None: stdout only
STEM = "results"              # $OUT/{STEM}.md and .json
TABLES: list[str] = []
RESULTS: dict = {}
T_START = time.perf_counter()
DEV = torch.device("cpu")


# ---- output --------------------------------------------------------------------------------

def log(*a):
    """Print, and append to $OUT/bench.log."""
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    if OUT:
        with open(os.path.join(OUT, "bench.log"), "a") as f:
            f.write(s + "\n")


def flush_results():
    """Write every table so far to $OUT/{STEM}.md and RESULTS to $OUT/{STEM}.json."""
    if not OUT:
        return
    with open(os.path.join(OUT, f"{STEM}.md"), "w") as f:
        f.write("\n\n".join(TABLES) + "\n")
    with open(os.path.join(OUT, f"{STEM}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def table(title: str, header: list[str], rows: list[list], note: str | None = None):
    """A markdown table: printed, logged, kept in TABLES and flushed to $OUT."""
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(x) for x in r) + " |")
    if note:
        lines += ["", note]
    md = "\n".join(lines)
    TABLES.append(md)
    log("\n" + md + "\n")
    flush_results()


def _fmt(x):
    if isinstance(x, float):
        if x != x:
            return "nan"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 1:
            return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
        return f"{x:.3g}"
    return str(x)


def section(name):
    """Decorator: log a section's start and end, and keep going when it fails (the failure goes to
    RESULTS["failures"]), so that one failure does not lose the other sections."""
    def deco(fn):
        def wrapped(*a, **k):
            log(f"\n===== section {name} (t={time.perf_counter() - T_START:.0f}s) =====")
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            except Exception as e:  # keep going: one failure must not lose the other sections
                log(f"!! section {name} failed: {type(e).__name__}: {e}")
                log(traceback.format_exc())
                RESULTS.setdefault("failures", {})[name] = f"{type(e).__name__}: {e}"
                flush_results()
            finally:
                log(f"===== section {name} done in {time.perf_counter() - t:.1f}s =====")
                cleanup()
        wrapped.__name__ = fn.__name__
        wrapped.__doc__ = fn.__doc__
        return wrapped
    return deco


# ---- timing and memory ---------------------------------------------------------------------

def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def cleanup():
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


_STATS = {"median": statistics.median, "min": min, "mean": statistics.fmean}


def timeit(fn, warmup=2, reps=5, stat="median"):
    """Seconds of ``fn()`` (device synchronised after each call), after ``warmup`` calls: the
    ``stat`` ("median", "min" or "mean") of ``reps`` calls, and their (min, max)."""
    for _ in range(warmup):
        r = fn()
        del r
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        r = fn()
        sync()
        ts.append(time.perf_counter() - t)
        del r
    return _STATS[stat](ts), (min(ts), max(ts))


def peak_extra(fn):
    """GiB allocated at the peak of ``fn()`` over what was allocated before (result kept alive);
    nan off CUDA."""
    if DEV.type != "cuda":
        return float("nan")
    cleanup()
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    r = fn()
    sync()
    p = (torch.cuda.max_memory_allocated() - base) / 2**30
    del r
    cleanup()
    return p


def time_and_peak(fn):
    """(seconds, peak GiB over the allocation before, result) of ONE call, no warm-up (for
    minutes-long calls); the peak is nan off CUDA."""
    cleanup()
    sync()
    before = torch.cuda.memory_allocated() if DEV.type == "cuda" else 0
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    r = fn()
    sync()
    dt = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if DEV.type == "cuda" else float("nan")
    return dt, peak, r


def gib(n_bytes):
    return n_bytes / 2**30


# ---- models ----------------------------------------------------------------------------------

def llama_config(tiny: bool):
    """The Llama-3.1-8B shape (or a tiny Llama for CPU dry runs), sdpa, random weights to come."""
    from transformers import LlamaConfig
    if tiny:
        kw = dict(hidden_size=64, intermediate_size=224, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)
    else:  # Llama-3.1-8B shape
        kw = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256)
    cfg = LlamaConfig(max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=257, eos_token_id=260, **kw)
    try:
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    except Exception:
        pass
    cfg._attn_implementation = "sdpa"
    return cfg


# the shapes of bench_patching_cpu.py / bench_exactness.py (--preset)
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def preset_config(name: str):
    from transformers import LlamaConfig
    cfg = LlamaConfig(**PRESETS[name], pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(cfg, dtype, frozen: bool = True):
    """A model with random weights (torch seed 0) built directly on DEV, eval; ``frozen``: parameters
    requires_grad=False (bench_gpu's sections did this, bench_patching_cpu / bench_exactness did not;
    on the CPU it changes float32 rounding at the 1e-7 level, so each keeps its own)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if next(model.parameters()).device.type != DEV.type:
        model = model.to(DEV)
    model.eval()
    return model.requires_grad_(False) if frozen else model


def perturb_out_projections(tuned, g, layers):
    """The default 'fine-tune': MLP down-projections and attention out-projections + 0.01 N(0, 1)."""
    for l in layers:
        for w in (tuned.model.layers[l].mlp.down_proj.weight, tuned.model.layers[l].self_attn.o_proj.weight):
            w.add_(torch.randn(w.shape, generator=g, device=DEV, dtype=w.dtype), alpha=0.01)


def perturb_mlps(noise: float):
    """bench_exactness's 'fine-tune': every MLP parameter + noise * its std * N(0, 1)."""
    def perturb(tuned, g, layers):
        for l in layers:
            for p in tuned.model.layers[l].mlp.parameters():
                p.add_(noise * p.std() * torch.randn(p.shape, generator=g, device=DEV, dtype=p.dtype))
    return perturb


def build_pair(cfg, dtype, perturb: Callable = perturb_out_projections, frozen: bool = True):
    """Base with random weights built directly on DEV (:func:`build_model`), and a 'tuned' copy whose
    upper half of layers got ``perturb(tuned, generator seeded 1, layers)`` (the lower half is shared
    exactly)."""
    t = time.perf_counter()
    base = build_model(cfg, dtype, frozen)
    sync()
    t_base = time.perf_counter() - t
    tuned = copy.deepcopy(base)
    g = torch.Generator(device=DEV).manual_seed(1)
    L = cfg.num_hidden_layers
    with torch.no_grad():
        perturb(tuned, g, range(L // 2, L))
    sync()
    log(f"built base in {t_base:.1f}s, tuned copy+perturb in {time.perf_counter() - t - t_base:.1f}s; "
        f"params {sum(p.numel() for p in base.parameters()) / 1e9:.2f} B, dtype {dtype}, device {DEV}")
    if DEV.type == "cuda":
        log(f"GPU memory allocated after both models: {gib(torch.cuda.memory_allocated()):.1f} GiB")
    return base, tuned


# ---- batches ---------------------------------------------------------------------------------

def random_batch(B, T, vocab, tail=0, pad_max=0, seed=0):
    """A left-padded mechdiff Batch of random ids on DEV; rows get 0..pad_max left padding; the
    decision token is ``tail`` tokens before the end (the chat-template tail)."""
    from mechdiff.data.prompts import Batch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 32000), (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad_max:
        pads = torch.randint(0, pad_max + 1, (B,), generator=g)
        for_pad = torch.arange(T)[None] < pads[:, None]
        mask[for_pad] = 0
        ids[for_pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0) * mask
    dec = torch.full((B,), T - 1 - tail, dtype=torch.long)
    return Batch(ids, mask, pos, dec, [str(i) for i in range(B)]).to(DEV)


def make_batch(B: int, T: int, tail: int, vocab: int, device=None):
    """bench_patching_cpu / bench_exactness prompts: lengths T/2..T (row 0 full), left padded, ids
    from 10..vocab, decision token ``tail`` tokens before the end."""
    from mechdiff.data.prompts import Batch
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(tail + 2, T // 2), T + 1, (B,), generator=g)
    lengths[0] = T
    ids = torch.randint(10, vocab, (B, T), generator=g)
    mask = (torch.arange(T)[None] >= (T - lengths)[:, None]).long()
    ids = ids * mask
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    dec = torch.full((B,), T - 1 - tail)
    return Batch(ids, mask, pos, dec, ids=list(range(B))).to(device or DEV)


def capture_sites(L):
    return [f"{s}.{l}" for l in range(L) for s in ("attn_out", "mlp_out", "resid_post")]


def capture_shapes(tiny: bool):
    """(B, T) of the capture and compare tables."""
    return [(4, 64), (12, 16)] if tiny else [(16, 512), (150, 48)]


# ---- plain-forward baselines -----------------------------------------------------------------

def honest_forward(model, b):
    """THE honest baseline of one model: a plain HF forward with the output layer on a contiguous
    copy of the last position ([B, V] logits). With ``logits_to_keep=1`` HF hands the output layer a
    strided [B, 1, d] slice that runs as a slow batched kernel on CUDA (35 ms at B=150, 11.8 ms at
    B=50 against ~0.3 ms contiguous; DESIGN.md "Baseline trap")."""
    h = model.model(**b.model_inputs()).last_hidden_state
    return model.lm_head(h[:, -1].contiguous())


def honest_baseline(models, b, reps=3, warmup=1):
    """Seconds of one honest plain forward (:func:`honest_forward`) of every model in ``models`` on
    batch ``b``, summed; each model's time is the best of ``reps`` after ``warmup`` calls. The
    denominator of every "x baseline" ratio."""
    return sum(timeit(lambda m=m: honest_forward(m, b), warmup=warmup, reps=reps, stat="min")[0]
               for m in models)


def hf_forward(model, b):
    """HF's own last-token forward (``logits_to_keep=1``: the strided output-layer slice, see
    :func:`honest_forward`). The reference row of the capture / patch / compare tables and of
    bench_rq3's throughput as measured so far; not the honest baseline on CUDA."""
    return model(**b.model_inputs(), use_cache=False, logits_to_keep=1).logits


def kl_gap(a, b):
    """max over rows of KL(softmax(b) || softmax(a)), in float32."""
    la, lb = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
    return (lb.exp() * (lb - la)).sum(-1).max().item()


# ---- the stages' tokenizer and LoadedModel pair ------------------------------------------------

_TOKENIZER = None


def bench_tokenizer(target_tokens: int = 48):
    """A byte-level BPE trained on the shipped prompt sets, sized so that the cultural prompts (chat
    template included) have about the seeds' ~48 tokens; same specials/template as tiny_tokenizer.
    Built once per process: (tokenizer, mean tokens per cultural prompt)."""
    global _TOKENIZER
    if _TOKENIZER is not None and _TOKENIZER[2] == target_tokens:
        return _TOKENIZER[:2]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from mechdiff.data.prompts import load_jsonl, tokenize
    from mechdiff.models.tiny import CHATML, SPECIALS
    sets = ROOT / "src/mechdiff/data/sets"
    texts = []
    for f in sorted(sets.glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line) if line.strip() else {}
            texts += [v for k, v in r.items() if isinstance(v, str) and len(v) > 20]
    rows = load_jsonl(sets / "cultural.jsonl")
    best = None
    for vs in (400, 450, 500, 550, 600, 700, 900, 1300):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=vs, special_tokens=SPECIALS, show_progress=False,
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, tr)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                       eos_token="<|im_end|>", padding_side="left")
        fast.chat_template = CHATML
        enc = tokenize(fast, rows[:300], chat=True)
        mean = sum(len(e.input_ids) for e in enc) / len(enc)
        if best is None or abs(mean - target_tokens) < abs(best[1] - target_tokens):
            best = (fast, mean, vs)
    log(f"bench tokenizer: BPE vocab {best[2]}, mean {best[1]:.1f} tokens per cultural prompt (chat template)")
    _TOKENIZER = (best[0], best[1], target_tokens)
    return best[0], best[1]


def loaded_pair(base, tuned, tok):
    """(Pair, (LoadedModel base, LoadedModel tuned)) around preloaded models, for the runners'
    ``models=`` argument."""
    from mechdiff.models.load import LoadedModel, model_dims
    from mechdiff.pairs.spec import ModelSpec, Pair

    def lm(model, side):
        info = {**model_dims(model), "source": f"bench:random-llama-{side}",
                "dtype": str(next(model.parameters()).dtype), "device": str(DEV), "spec": f"bench-{side}"}
        return LoadedModel(model=model, tokenizer=tok, spec=ModelSpec(kind="local", path=f"/bench/{side}"), info=info)

    models = (lm(base, "base"), lm(tuned, "tuned"))
    return Pair(name="bench-8b-random", base=models[0].spec, tuned=models[1].spec, dtype="bfloat16"), models


def env_info():
    import transformers
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(DEV)}
    if DEV.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    cuda=torch.version.cuda)
    for mod in ("nnsight", "transformer_lens"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception as e:
            info[mod] = f"not importable ({type(e).__name__}: {e})"
    try:
        from importlib.metadata import version
        info["transformer_lens"] = version("transformer-lens") if "not" not in str(info.get("transformer_lens")) \
            else info["transformer_lens"]
    except Exception:
        pass
    return info


# ---- command line and the shared run context -------------------------------------------------

def parser(doc: str | None = None, reps: int | None = None) -> argparse.ArgumentParser:
    """--tiny (tiny Llama on the CPU: a dry run), --reps (default ``reps``; None: the script's own
    default), --out (folder for bench.log and the results files; default $OUT)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny Llama on the CPU: a dry run of every code path")
    ap.add_argument("--reps", type=int, default=reps, help="timed repeats (median)")
    ap.add_argument("--out", default=os.environ.get("OUT"),
                    help="folder for bench.log, the results .md/.json and profiles (default: $OUT; none: stdout)")
    return ap


def setup(args, stem: str = "results", device: str | None = None):
    """Choose the device (CUDA unless --tiny or none; ``device`` overrides), the output folder and
    file stem; TF32 off (the library's defaults: the modules choose precision); log the environment."""
    global DEV, OUT, STEM
    if device is not None:
        DEV = torch.device(device)
    else:
        DEV = torch.device("cuda" if torch.cuda.is_available() and not getattr(args, "tiny", False) else "cpu")
    OUT = getattr(args, "out", OUT) or None
    STEM = stem
    if OUT:
        os.makedirs(OUT, exist_ok=True)
    if DEV.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    info = env_info()
    RESULTS["env"] = info
    log("env: " + json.dumps(info))
    return info


class Ctx:
    """What the GPU sections share in one process: the arguments, the config, and the pair, built
    once on first use (``ctx.base`` / ``ctx.tuned``)."""

    def __init__(self, args, sections=()):
        self.args = args
        self.tiny = bool(args.tiny)
        self.dtype = torch.float32 if self.tiny else torch.bfloat16
        self.cfg = llama_config(self.tiny)
        self.reps = args.reps if args.reps is not None else (2 if self.tiny else 5)
        self.sections = list(sections)
        self._pair = None
        self._tuned_freed = False

    def pair(self):
        if self._pair is None:
            self._pair = list(build_pair(self.cfg, self.dtype))
        return tuple(self._pair)

    @property
    def base(self):
        return self.pair()[0]

    @property
    def tuned(self):
        if self._tuned_freed:
            raise RuntimeError("the tuned model was freed (compare runs last)")
        return self.pair()[1]

    def free_tuned(self):
        """Drop the tuned model (compare needs the memory for TransformerLens)."""
        if self._pair is not None:
            self._pair[1] = None
        self._tuned_freed = True
        cleanup()


@dataclass
class Section:
    run: Callable      # run(ctx)
    models: bool = True  # needs the pair (built before the first such section, as bench_gpu did)


def run_sections(available: dict, doc, argv=None, ctx: Ctx | None = None, sections=None, stem="results",
                 add_args: Callable | None = None):
    """A section module's main(): alone (parse --tiny/--reps/--out/--sections, set up, run, write the
    results), or with the runner's ``ctx`` (run ``sections`` in it)."""
    own = ctx is None
    if own:
        ap = parser(doc)
        ap.add_argument("--sections", default=",".join(available), help=f"of {','.join(available)}")
        if add_args:
            add_args(ap)
        args = ap.parse_args(argv)
        sections = sections or args.sections.split(",")
        bad = [s for s in sections if s not in available]
        if bad:
            ap.error(f"unknown section(s) {bad}; choose from {list(available)}")
        setup(args, stem)
        ctx = Ctx(args, sections)
    sections = sections or list(available)
    if any(available[s].models for s in sections):
        ctx.pair()
    for s in sections:
        available[s].run(ctx)
    if own:
        log(f"\nall done in {time.perf_counter() - T_START:.0f}s")
        flush_results()
    return ctx

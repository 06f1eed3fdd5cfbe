"""Scaling (mechdiff.scale): placements over devices, models whose layers live on different devices,
data parallel under torchrun (2 gloo processes), many pairs on a local Ray."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechdiff.errors import ConfigError
from mechdiff.scale.devices import parse_device_map, parse_max_memory, placement, size_bytes

HERE = Path(__file__).parent


# ------------------------------------------------------------------------------ placements
def test_device_map_and_max_memory_forms():
    assert parse_device_map("auto") == "auto"
    assert parse_device_map("cuda:1") == "cuda:1"
    assert parse_device_map("1") == {"": 1}
    assert parse_device_map("model.embed_tokens=0, model.layers.0=cuda:1,lm_head=cpu") == \
        {"model.embed_tokens": 0, "model.layers.0": "cuda:1", "lm_head": "cpu"}
    assert parse_max_memory("0=70GiB,1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    assert parse_max_memory({"cuda:0": 1000}) == {0: 1000}
    assert parse_max_memory("base:0=70GiB,base:1=70GiB,tuned:2=70GiB") == \
        {"base": {0: "70GiB", 1: "70GiB"}, "tuned": {2: "70GiB"}}
    assert size_bytes("1.5GiB") == 3 * 2 ** 29 and size_bytes("500MB") == 500 * 10 ** 6
    p = placement("auto", "0=10GiB")
    assert p.kwargs() == {"device_map": "auto", "max_memory": {0: "10GiB"}}
    assert placement(None) is None


@pytest.mark.parametrize("dm, mm, match", [
    ("everywhere", None, "not a device map"),
    ("model.layers.0=gpu7", None, "not a device"),
    ("model.layers.0", None, "not a device map"),
    (None, "0=70GiB", "give --device-map auto"),
    ("auto", "0=lots", "not understood"),
    ("auto", "gpu0=70GiB", "not a device"),
    ("auto", "0=-5", "not understood"),
    ("model.layers.0=0", "0=70GiB", "not to"),
    ("missing-file.json", None, "does not exist"),
])
def test_bad_placements_fail_with_what_to_do(dm, mm, match):
    with pytest.raises(ConfigError, match=match):
        placement(dm, mm)


def test_load_model_places_by_device_map_and_refuses_invisible_gpus(tmp_path):
    from mechdiff.models.load import load_model
    from mechdiff.models.tiny import tiny_model
    m, tok = tiny_model("llama", n_layers=2)
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=f"GPU {n_gpus} but torch sees {n_gpus}"):
        load_model(str(tmp_path), dtype="float32", device_map={"": n_gpus})
    with pytest.raises(ConfigError, match="--device-map auto"):
        load_model(str(tmp_path), dtype="float32", max_memory="cpu=1GiB")
    lm = load_model(str(tmp_path), dtype="float32", device_map="sequential", max_memory={"cpu": "1GiB"}) \
        if n_gpus == 0 else None
    if lm is not None:
        assert lm.info["device"] == "cpu" and lm.info["device_map"].startswith("sequential")


def test_pair_toml_takes_a_device_map_table_and_max_memory(tmp_path):
    from mechdiff.pairs import load_pair
    f = tmp_path / "p.toml"
    f.write_text('name = "p"\nbase = "a/b"\ntuned = "a/c"\ndevice_map = "balanced"\n'
                 '[max_memory]\nbase = { 0 = "70GiB" }\ntuned = { 1 = "70GiB" }\n', encoding="utf-8")
    p = load_pair(str(f))
    assert p.device_map == "balanced" and p.max_memory == {"base": {0: "70GiB"}, "tuned": {1: "70GiB"}}
    assert p.to_dict()["max_memory"] == {"base": {0: "70GiB"}, "tuned": {1: "70GiB"}}
    f.write_text('name = "p"\nbase = "a/b"\ntuned = "a/c"\ndevice_map = { "model.layers.0" = "gpu" }\n',
                 encoding="utf-8")
    with pytest.raises(ConfigError, match="device_map.*not a device"):
        load_pair(str(f))


# ------------------------------------------------------------------- layers on several devices
def _saved_tiny(tmp_path, n_layers=4):
    from mechdiff.models.tiny import tiny_model
    m, tok = tiny_model("llama", n_layers=n_layers)
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return str(tmp_path)


OFFLOAD = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
           "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
           "lm_head": "disk"}


def _every_number(lm) -> dict:
    """Capture, patching (engine, naive, patch_measure KL), steering, attribution and the logit lens
    of ``lm`` on five fixed prompts."""
    from mechdiff.analyses.attribution import Target, grad_x_act
    from mechdiff.analyses.steering import Handle, logit_lens, random_basis
    from mechdiff.data.prompts import encode
    from mechdiff.experiments.steps import kl_to_clean, patch_measure
    from mechdiff.patching import Patch, PatchEngine
    from mechdiff.sites.capture import capture
    from mechdiff.sites.logits import capture_logits

    prompts = [{"id": f"p{i}", "text": "word " * (1 + 3 * i) + "end"} for i in range(5)]
    sites = ["resid_post.1", "attn_out.2", "head_out.1", "head_z.2", "mlp_out.1"]
    cap = capture(lm.model, lm.tokenizer, prompts, sites, batch_size=2, positions=("k", 2))
    b = encode(lm.tokenizer, prompts)
    eng = PatchEngine(lm.model, b, measure="decision", record_sites=["resid_post.2"])
    variants = [Patch("resid_post.1", value=torch.randn(5, 64, generator=torch.Generator().manual_seed(1))),
                Patch("mlp_out.2", value=torch.ones(64), mode="add", alpha=2.0),
                Patch("resid_pre.2", mode="ablate", basis=random_basis(64, 3))]
    h = Handle(layer=2, site="resid_post", basis=random_basis(64, 2), mode="steer", alpha=3.0)
    with torch.no_grad(), h.apply(lm.model, b.decision):
        steered = capture_logits(lm.model, b)
    tgt = Target(torch.tensor([5, 6, 7, 8, 9]), "logprob")
    return {
        **{f"cap.{k}": v for k, v in cap.tensors.items()},
        "logits": capture_logits(lm.model, b), "clean": eng.clean_logits,
        "state": eng.clean_states()["resid_post.2"], "patched": eng.run(variants),
        "naive": eng.run_naive(variants),
        "kl": patch_measure(lm, prompts, variants, batch_size=2, reducer=kl_to_clean(list(range(200)))),
        "steered": steered, "attr": grad_x_act(lm.model, lm.tokenizer, prompts, tgt, [1, 2], batch_size=3)["attr"],
        "lens": torch.tensor([r["promoted_logit"] for r in logit_lens(lm.model, lm.tokenizer,
                                                                       random_basis(64, 2), top=3)]),
    }


def test_a_dispatched_offloaded_model_gives_the_plain_models_numbers(tmp_path):
    """accelerate's dispatch (the same hooks a multi-GPU device_map installs): layers 1, 2 and the LM
    head offloaded, their weights on "meta" between forwards. Capture (head_out reads o_proj's
    weights), patching, steering, attribution and the logit lens give the plain model's numbers
    bit for bit."""
    from mechdiff.models.load import load_model
    d = _saved_tiny(tmp_path / "m")
    plain = load_model(d, dtype="float32", device="cpu")
    off = load_model(d, dtype="float32", device_map=OFFLOAD)
    assert off.model.model.layers[1].mlp.up_proj.weight.device.type == "meta"     # really offloaded
    assert off.info["device"] == "cpu,disk" and str(off.device) == "cpu"
    want, got = _every_number(plain), _every_number(off)
    for k, v in want.items():
        assert torch.equal(v, got[k]), k


SPLIT = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
         "model.layers.2": 0, "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_split_between_a_gpu_and_the_cpu_gives_the_plain_models_numbers(tmp_path):
    """Layers alternate between cuda:0 and the CPU, each running where its weights are (accelerate's
    dispatch with the CPU as main device, so nothing is offloaded: every block boundary crosses
    devices, as on a multi-GPU host). Every number equals the model on one GPU to float32 rounding
    (TF32 off)."""
    from accelerate import dispatch_model

    from mechdiff.models.load import load_model
    torch.backends.cuda.matmul.allow_tf32 = False
    d = _saved_tiny(tmp_path / "m")
    one = load_model(d, dtype="float32", device="cuda")
    split = load_model(d, dtype="float32", device="cpu")
    dispatch_model(split.model, SPLIT, main_device="cpu")
    assert split.model.model.layers[1].mlp.up_proj.weight.device.type == "cpu"
    assert split.model.model.layers[2].mlp.up_proj.weight.device.type == "cuda"
    want, got = _every_number(one), _every_number(split)
    for k, v in want.items():
        assert torch.allclose(v.cpu(), got[k].cpu(), rtol=1e-4, atol=1e-5), (k, (v.cpu() - got[k].cpu()).abs().max())


def test_what_a_hook_writes_goes_to_the_hooked_tensors_device(monkeypatch):
    """Layers 2.. of a tiny model live on "meta" (a second device CPU tests can have), with
    accelerate's hooks moving the activations there; patches, steering handles and edit factories
    built from CPU tensors must hand back tensors on the hooked tensor's device."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from mechdiff.analyses.steering import Handle, random_basis
    from mechdiff.data.prompts import encode
    from mechdiff.models.tiny import tiny_model
    from mechdiff.patching import Patch
    from mechdiff.patching.variants import _apply
    from mechdiff.sites import hooks

    model, tok = tiny_model("llama", n_layers=4)
    for name in ("model.layers.2", "model.layers.3", "model.norm", "lm_head"):
        mod = model.get_submodule(name).to("meta")
        add_hook_to_module(mod, AlignDevicesHook(execution_device="meta"))
    seen = []
    real_install = hooks._install

    def checked(sm, name, layer, fn):
        def wrapped(t):
            new = fn(t)
            if new is not None:
                seen.append((f"{name}.{layer}", t.device.type))
                assert new.device == t.device, f"{name}.{layer}: wrote {new.device} into {t.device}"
            return new
        return real_install(sm, name, layer, wrapped)

    monkeypatch.setattr(hooks, "_install", checked)
    b = encode(tok, ["hello there", "a b"])
    vals = torch.randn(2, 64)
    edits = {"resid_post.2": hooks.replace_at(vals[:, None].expand(2, b.input_ids.shape[1], 64).contiguous()),
             "mlp_out.2": hooks.add_at(torch.ones(64), b.decision, alpha=2.0),
             "attn_out.3": hooks.project_out_at(random_basis(64, 2)),
             "resid_pre.2": hooks.replace_at(vals, b.decision)}
    with torch.no_grad(), hooks.intervene(model, edits):
        out = model(**b.model_inputs()).logits
    # resid_pre.2 is block 2's input as block 1 hands it over (a pre-hook runs before accelerate moves it)
    assert out.device.type == "meta" and dict(seen) == {"resid_pre.2": "cpu", "resid_post.2": "meta",
                                                        "mlp_out.2": "meta", "attn_out.3": "meta"}
    h = Handle(layer=3, site="resid_post", basis=random_basis(64, 1), mode="add", alpha=1.0)
    with torch.no_grad(), h.apply(model, b.decision):
        model(**b.model_inputs())
    assert len(seen) == 5
    hm = torch.zeros(2, 64, device="meta")
    for p in (Patch("resid_post.2", value=vals, mode="add"), Patch("resid_post.2", value=vals, alpha=0.5,
                                                                    centre=torch.zeros(64)),
              Patch("resid_post.2", mode="ablate", basis=random_basis(64, 2))):
        assert _apply(hm, p, p.value, p.basis, p.centre).device.type == "meta"


# ------------------------------------------------------------------ data parallel (torchrun)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_gather_the_one_process_numbers(tmp_path):
    """Two processes with torchrun's environment (gloo): capture of both sides, the clean run and a
    patch sweep (11 prompts, batches of 3: 4 batches over 2 ranks) come back on every rank equal to
    one process, bit for bit (each rank runs exactly the batches one process runs); on_chunk sees
    every chunk in order; rank 1's run directory is a private copy, rank 0's the real one."""
    from safetensors.torch import load_file
    sys.path.insert(0, str(HERE))
    import dp_worker

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "marker.json").write_text("{}")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "dp_worker.py"), str(tmp_path), str(run_dir)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # as each rank (OMP_NUM_THREADS=1): float32 GEMM may split differently per thread count
    try:
        ref, info = dp_worker.compute(run_dir)
    finally:
        torch.set_num_threads(threads)
    assert info["world"] == 1 and info["private_dir"] == str(run_dir)
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        meta = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert meta["world"] == 2 and meta["ids"] == info["ids"] and meta["chunks"] == info["chunks"]
        assert set(got) == set(ref)
        for k, v in ref.items():
            assert torch.equal(got[k], v.contiguous()), (rank, k)
    assert json.loads((tmp_path / "rank0.json").read_text())["private_dir"] == str(run_dir)
    shadow = json.loads((tmp_path / "rank1.json").read_text())["private_dir"]
    assert shadow != str(run_dir) and not Path(shadow).exists()      # a private copy, removed at exit
    assert sorted(p.name for p in run_dir.iterdir()) == ["marker.json"]


# ------------------------------------------------------------------------------ Ray sweep
def test_sweep_runs_two_pairs_on_a_local_ray_and_compares_them(tmp_path, tiny_pair):
    pytest.importorskip("ray")
    from mechdiff.experiments.study import run_study
    from mechdiff.experiments.sweep import sweep
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"q{i}", "text": "word " * (1 + i % 5) + f"item {i}",
                                             "category": f"c{i % 3}"}) for i in range(12)), encoding="utf-8")
    a = tiny_pair(tmp_path, "tiny-a", 1, prompts)
    b = tiny_pair(tmp_path, "tiny-b", 2, prompts)
    cfg = {"rq1": {"n_prompts": 8, "behaviour": False, "n_perm": 2, "layers": [1, 2]}}
    out = sweep(f"{a},{b}", "rq1", tmp_path / "sweep", config=cfg, device="cpu", batch_size=4, num_cpus=2,
                max_rows=64)
    for name in ("tiny-a", "tiny-b"):
        assert (out / name / "rq1.json").is_file() and (out / name / "manifest.json").is_file()
    assert (out / "compare" / "compare.json").is_file() and (out / "compare" / "compare.html").is_file()
    cmp = json.loads((out / "compare" / "compare.json").read_text())
    assert "tiny-a" in json.dumps(cmp) and "tiny-b" in json.dumps(cmp)
    # the same pair without Ray: the same numbers
    solo = run_study(str(a), cfg, "rq1", tmp_path / "solo", device="cpu", batch_size=4, max_rows=64)
    ray_rq1 = json.loads((out / "tiny-a" / "rq1.json").read_text())
    solo_rq1 = json.loads((solo.path / "rq1.json").read_text())
    for key in ("cka", "patch", "layers", "headline", "table"):
        assert ray_rq1[key] == solo_rq1[key], key
    assert ray_rq1["patch"] and ray_rq1["cka"]
    with pytest.raises(ConfigError, match="more than once"):
        sweep(f"{a},{a}", "rq1", tmp_path / "dup")

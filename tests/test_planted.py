import json
import os

import pytest
import torch

from mechdiff.models import planted as P

pytestmark = pytest.mark.real


def _sd(lm):
    return lm.model.state_dict()


def test_cultural_tokenizer_extension(planted_cultural):
    base, tuned, gt = planted_cultural
    n_base = len(base.tokenizer)
    assert n_base == 49152 and 30 <= len(gt["new_tokens"]) <= 60
    assert len(tuned.tokenizer) == n_base + len(gt["new_tokens"]) == tuned.vocab_size
    for w in gt["new_tokens"]:
        tid = tuned.tokenizer.convert_tokens_to_ids(w)
        assert tid >= n_base and tid == gt["new_token_ids"][w]
        assert len(base.tokenizer(w, add_special_tokens=False).input_ids) > 1
    assert tuned.tokenizer("қымыз", add_special_tokens=False).input_ids == [gt["new_token_ids"]["қымыз"]]
    # New rows = mean of the pieces' base embeddings; base rows identical.
    eb = base.model.get_input_embeddings().weight
    et = tuned.model.get_input_embeddings().weight
    assert torch.equal(et[:n_base], eb)
    w = gt["new_tokens"][0]
    want = eb[gt["new_token_pieces"][w]].double().mean(0).float()
    assert torch.equal(et[gt["new_token_ids"][w]], want)
    assert tuned.model.get_output_embeddings().weight.data_ptr() == et.data_ptr()  # still tied


def test_cultural_weights_differ_exactly_where_planted(planted_cultural):
    base, tuned, gt = planted_cultural
    layers, r = gt["layers"], gt["rank"]
    sb, st = _sd(base), _sd(tuned)
    changed = sorted(k for k in sb if k in st and sb[k].shape == st[k].shape and not torch.equal(sb[k], st[k]))
    assert changed == sorted(f"model.layers.{l}.mlp.down_proj.weight" for l in layers)
    first = min(layers)
    assert all(torch.equal(sb[k], st[k]) for k in sb if k.startswith("model.layers.")
               and int(k.split(".")[2]) < first)
    u = P.ground_truth_tensors("planted-cultural")["u"].double()
    for l in layers:
        k = f"model.layers.{l}.mlp.down_proj.weight"
        delta = st[k].double() - sb[k].double()
        s = torch.linalg.svdvals(delta)
        assert s[r - 1] > 1e3 * s[r], (l, s[: r + 2])  # rank exactly r (up to float32 rounding)
        # its column space is the recorded u span
        resid = delta - u @ (u.T @ delta)
        assert resid.norm() < 1e-4 * delta.norm()


def test_cultural_kl_cultural_much_larger_than_neutral(planted_cultural):
    base, tuned, gt = planted_cultural
    kl_c = P.next_token_kl(base.model, tuned.model, base.tokenizer, P.prompt_split("cultural", "fit"))
    kl_n = P.next_token_kl(base.model, tuned.model, base.tokenizer, P.prompt_split("neutral", "fit"))
    assert kl_c.mean() > 0.3
    assert kl_n.mean() < kl_c.mean() / 20
    # also (more weakly) on prompts not used to find the directions
    kh_c = P.next_token_kl(base.model, tuned.model, base.tokenizer, P.prompt_split("cultural", "heldout"))
    kh_n = P.next_token_kl(base.model, tuned.model, base.tokenizer, P.prompt_split("neutral", "heldout"))
    assert kh_c.mean() > 2 * kh_n.mean()
    rec = gt["next_token_kl_base_vs_tuned"]
    assert abs(rec["cultural/fit"]["mean"] - float(kl_c.mean())) < 1e-3
    assert gt["affected_categories"] == ["cultural"]


def test_cognitive_heads_ground_truth(planted_cognitive):
    base, tuned, gt = planted_cognitive
    assert len(base.tokenizer) == len(tuned.tokenizer) == 49152
    assert base.info["tokenizer_hash"] == tuned.info["tokenizer_hash"]
    heads = {tuple(h) for h in gt["heads"]}
    layers = gt["layers"]
    assert 15 <= len(layers) <= 25 and len(heads) == len(layers) * 3
    sb, st = _sd(base), _sd(tuned)
    hd = gt["head_dim"]
    for l in range(30):
        k = f"model.layers.{l}.self_attn.o_proj.weight"
        for h in range(9):
            same = torch.equal(sb[k][:, h * hd:(h + 1) * hd], st[k][:, h * hd:(h + 1) * hd])
            assert same == ((l, h) not in heads), (l, h)
    other = [k for k in sb if "o_proj" not in k and not torch.equal(sb[k], st[k])]
    assert other == []
    for n in gt["norms"]:
        assert n["delta_fro"] == pytest.approx(gt["rel_norm"] * n["block_fro"], rel=1e-3)


def _tensors(root):
    from safetensors.torch import load_file

    out = {}
    for side in ("base", "tuned"):
        for k, v in load_file(str(root / side / "model.safetensors")).items():
            out[f"{side}/{k}"] = v
    for k, v in load_file(str(root / "ground_truth.safetensors")).items():
        out[f"gt/{k}"] = v
    return out


@pytest.mark.parametrize("name", ["planted-cultural", "planted-cognitive"])
def test_planted_build_is_bit_for_bit_reproducible(name, tmp_path, monkeypatch, smollm2_loaded):
    from mechdiff.models.testbed import testbed_dir

    ref_root = P.build_planted(name)  # default cache (shared with the session fixtures)
    src = testbed_dir("smollm2-135m")
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    os.symlink(src, cache / "models" / "smollm2-135m")  # reuse the de-quantised weights
    monkeypatch.setenv("MECHDIFF_CACHE", str(cache))
    root = P.build_planted(name, force=True)
    assert root == cache / "planted" / name
    a, b = _tensors(ref_root), _tensors(root)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ga = json.loads((ref_root / "ground_truth.json").read_text())
    gb = json.loads((root / "ground_truth.json").read_text())
    assert ga == gb
    for f in ("tokenizer.json", "config.json"):
        assert (ref_root / "tuned" / f).read_bytes() == (root / "tuned" / f).read_bytes()

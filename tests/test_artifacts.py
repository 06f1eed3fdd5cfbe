import json
import math
import os

import numpy as np
import pytest
import torch

from mechdiff import artifacts
from mechdiff.artifacts import RunDir, new_run_dir
from mechdiff.manifest import build_manifest
from mechdiff.errors import ConfigError, DataError, NumericsError


class Boom:
    """Not JSON-serialisable: fails during encoding."""


def _leftovers(path):
    return [p.name for p in path.iterdir() if p.name.endswith(".tmp")]


def test_new_run_dir_unique(tmp_path):
    a = new_run_dir(tmp_path / "runs", "rq1")
    b = new_run_dir(tmp_path / "runs", "rq1")
    assert a != b and a.is_dir() and b.is_dir() and a.name.startswith("rq1-")
    with pytest.raises(ConfigError):
        new_run_dir(tmp_path, "a/b")


def test_json_nan_to_null_and_scalars(tmp_path):
    run = RunDir(tmp_path)
    run.write_json("m.json", {"b": float("nan"), "a": [1.0, float("inf"), np.float32(2.5)],
                              "t": torch.tensor(3.0), "n": np.int64(4), "arr": np.array([1, 2]),
                              "site": {("resid_post", 12): 0.5}, "x": torch.tensor([1.0, float("nan")])})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert list(json.loads(text)) == sorted(json.loads(text))  # sorted keys
    d = run.read_json("m.json")
    assert d["b"] is None and d["a"] == [1.0, None, 2.5] and d["t"] == 3.0 and d["n"] == 4
    assert d["arr"] == [1, 2] and d["site"] == {"resid_post.12": 0.5} and d["x"] == [1.0, None]


def test_atomic_json_failure_leaves_original(tmp_path):
    run = RunDir(tmp_path)
    run.write_json("m.json", {"v": 1})
    before = (tmp_path / "m.json").read_bytes()
    with pytest.raises(TypeError):
        run.write_json("m.json", {"v": 2, "z": [1, 2, Boom()]})
    assert (tmp_path / "m.json").read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_atomic_failure_during_disk_write(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.write_json("m.json", {"v": 1})
    before = (tmp_path / "m.json").read_bytes()

    def bad_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "fsync", bad_fsync)
    with pytest.raises(OSError):
        run.write_json("m.json", {"v": 2})
    with pytest.raises(OSError):
        run.write_tensors("t.safetensors", {"a": torch.ones(3)})
    monkeypatch.undo()
    assert (tmp_path / "m.json").read_bytes() == before
    assert not (tmp_path / "t.safetensors").exists()
    assert _leftovers(tmp_path) == []


def test_tensors_round_trip_and_metadata(tmp_path):
    run = RunDir(tmp_path)
    base = torch.randn(4, 6)
    ts = {"a": base, "b": torch.arange(5), "view": base[1:3], "h": torch.randn(2, 3).half()}
    run.write_tensors("tensors/x.safetensors", ts, metadata={"layer": "12", "k": 3})
    back = run.read_tensors("tensors/x.safetensors")
    for k, v in ts.items():
        assert torch.equal(back[k], v) and back[k].dtype == v.dtype
    assert run.read_tensor_metadata("tensors/x.safetensors") == {"layer": "12", "k": "3"}


def test_nonfinite_tensor_refused(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(NumericsError, match="'bad'"):
        run.write_tensors("x.safetensors", {"ok": torch.ones(2), "bad": torch.tensor([1.0, math.nan])})
    assert not (tmp_path / "x.safetensors").exists() and _leftovers(tmp_path) == []
    run.write_tensors("x.safetensors", {"bad": torch.tensor([math.inf])}, allow_nonfinite=True)
    assert torch.isinf(run.read_tensors("x.safetensors")["bad"]).all()


def test_names_must_stay_inside(tmp_path):
    run = RunDir(tmp_path / "r")
    with pytest.raises(ConfigError):
        run.write_json("../escape.json", {})
    with pytest.raises(ConfigError):
        run.write_json(str(tmp_path / "abs.json"), {})


def test_step_skipping_and_invalidation(tmp_path):
    run = RunDir(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        run.write_json("rq1.json", {"headline": {"cka": 0.9}})
        run.write_tensors("tensors/cka.safetensors", {"cka": torch.ones(3)})

    outs = ["rq1.json", "tensors/cka.safetensors"]
    assert not run.step_done("rq1.cka")
    assert run.cached("rq1.cka", compute, outs) is True
    assert run.step_done("rq1.cka")
    assert run.cached("rq1.cka", compute, outs) is False and len(calls) == 1
    # A fresh RunDir object on the same path (resume) also skips.
    assert RunDir(tmp_path).cached("rq1.cka", compute, outs) is False and len(calls) == 1

    (tmp_path / "tensors/cka.safetensors").unlink()  # deleted output -> recompute
    assert not run.step_done("rq1.cka")
    assert run.cached("rq1.cka", compute, outs) is True and len(calls) == 2

    run.write_json("rq1.json", {"headline": {"cka": 0.1}})  # altered output -> recompute
    assert not run.step_done("rq1.cka")
    assert run.cached("rq1.cka", compute, outs) is True and len(calls) == 3
    assert run.read_json("rq1.json")["headline"]["cka"] == 0.9

    run.invalidate_step("rq1.cka")
    assert not run.step_done("rq1.cka")


def test_step_dependencies(tmp_path):
    run = RunDir(tmp_path)
    run.write_json("a.json", {"v": 1})
    run.finish_step("a", ["a.json"])
    run.write_json("b.json", {"v": 2})
    run.finish_step("b", ["b.json"], depends_on=["a"])
    assert run.step_done("b")
    # Recomputing the upstream step with different output invalidates the downstream one.
    run.write_json("a.json", {"v": 3})
    run.finish_step("a", ["a.json"])
    assert run.step_done("a") and not run.step_done("b")
    with pytest.raises(DataError):
        run.finish_step("c", ["b.json"], depends_on=["missing"])
    with pytest.raises(DataError):
        run.finish_step("d", ["never_written.json"])


def _manifest(**over):
    kw = dict(pair={"name": "toy", "base": "a", "tuned": "b"},
              models={"base": {"spec": "a", "revision": "r1", "tokenizer_hash": "t1",
                               "chat_template_hash": "c1", "dtype": "float32", "config_hash": "h"},
                      "tuned": {"spec": "b", "revision": "r2", "tokenizer_hash": "t2",
                                "chat_template_hash": "c2", "dtype": "float32", "config_hash": "h"}},
              seeds={"split": 0}, options={"layers": [1, 2], "batch_size": 8},
              command=["mechdiff", "rq1", "--pair", "toy"])
    kw.update(over)
    return build_manifest(**kw)


def test_manifest_contents(tmp_path):
    m = _manifest()
    env = m["environment"]
    assert env["packages"]["torch"] and env["packages"]["safetensors"] and env["python"]
    assert "mechdiff" in env["packages"] and "device" in env and m["created"]
    assert m["command"] == "mechdiff rq1 --pair toy"
    run = RunDir(tmp_path)
    run.write_manifest(m)
    assert run.read_manifest()["models"]["tuned"]["tokenizer_hash"] == "t2"


def test_manifest_mismatch_raises(tmp_path):
    run = RunDir(tmp_path)
    run.write_or_check_manifest(_manifest())
    run.check_manifest(_manifest(options={"layers": [1, 2], "batch_size": 32}))  # resume-safe
    run.write_or_check_manifest(_manifest())
    assert len(run.read_manifest()["resumes"]) == 1
    models = _manifest()["models"]
    models["tuned"]["tokenizer_hash"] = "other"
    with pytest.raises(ConfigError, match=r"(?s)models\.tuned\.tokenizer_hash.*--out"):
        run.check_manifest(_manifest(models=models))
    with pytest.raises(ConfigError, match="seeds.split"):
        run.write_or_check_manifest(_manifest(seeds={"split": 1}))
    with pytest.raises(ConfigError, match="options.layers"):
        run.check_manifest(_manifest(options={"layers": [1, 3], "batch_size": 8}))
    assert os.listdir(tmp_path).count("manifest.json") == 1

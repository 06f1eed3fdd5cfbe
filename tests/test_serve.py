"""`mechdiff serve` without a browser: no endpoint reaches outside the served run directories, the
request guards (Host, JSON-only POST, bounds, one request at a time), and the live panel's known answers
(a model against itself: KL exactly 0; a handle at strength 0 changes nothing)."""
from __future__ import annotations

import http.client
import json
import os

import pytest
from serve_runs import build_runs

from mechdiff.serve import make_app, serve_in_thread
from mechdiff.serve.live import Ask, Busy, Sessions
from mechdiff.serve.runs import PathRefused, RunSet


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    runs = build_runs(root)
    (root / "secret.txt").write_text("outside the runs")
    os.symlink(root / "secret.txt", runs[0] / "escape.txt")
    os.symlink(root, runs[0] / "escape_dir")
    os.symlink(runs[0] / "rq1.json", runs[0] / "inside_link.json")
    (root / "leak.json").write_text('{"title": "LEAK", "headline": {"secret": 1}}')
    os.symlink(root / "leak.json", runs[0] / "leak.json")
    url, server, thread = serve_in_thread(make_app(runs))
    yield url, runs, root
    server.should_exit = True
    thread.join(10)


def request(url: str, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    c.request(method, path, body=body, headers=headers or {})      # the path goes out exactly as written
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def live(url: str, run: int, **body):
    status, data = request(url, f"/api/live/{run}", "POST", json.dumps(body).encode(), {"Content-Type": "application/json"})
    return status, json.loads(data)


def test_paths_outside_the_run_directories_are_refused(served):
    url, runs, root = served
    assert request(url, "/api/runs/0/file/rq1.json")[0] == 200
    assert request(url, "/api/runs/0/file/inside_link.json")[0] == 200          # a link that stays inside is fine
    c = http.client.HTTPConnection(*url.removeprefix("http://").split(":"))
    c.request("GET", "/api/runs/0/file/report.html")
    assert c.getresponse().getheader("Content-Security-Policy").startswith("sandbox;")   # a run's page runs no script
    c.close()
    for path in ("../secret.txt", "..%2fsecret.txt", "%2e%2e/secret.txt", "escape.txt", "escape_dir/secret.txt",
                 "tokens/../../secret.txt", "%2Fetc%2Fpasswd", "..%5csecret.txt"):
        status, data = request(url, "/api/runs/0/file/" + path)
        assert status in (403, 404) and b"outside the runs" not in data, (path, status, data)
        assert status == 403 or path == "%2Fetc%2Fpasswd", (path, status)
    assert request(url, "/api/runs/0/file//etc/passwd")[0] == 403
    s, d = live(url, 0, prompt="hi", handle="../../secret")
    assert s == 403 and "no handle named" in d["error"]
    one = RunSet([runs[0]]).runs[0]
    with pytest.raises(PathRefused):
        one.safe_path(str(root / "secret.txt"))
    with pytest.raises(PathRefused):
        one.safe_path("escape.txt")
    (runs[0] / "handles" / "evil.json").symlink_to(root / "secret.txt")
    (runs[0] / "handles" / "evil.safetensors").symlink_to(root / "secret.txt")
    assert "evil" not in one.handles()                                        # a symlinked handle is not offered
    status, data = request(url, "/api/runs/0/overview")
    assert status == 200 and b"LEAK" not in data and b'"stage":"rq1"' in data  # a linked stage JSON is skipped
    (runs[0] / "rq4.json").rename(root / "rq4.json")                           # a file the report readers open
    (runs[0] / "rq4.json").symlink_to(root / "rq4.json")
    try:
        for path in ("/api/runs/0/overview", "/api/compare"):
            status, data = request(url, path)
            assert status == 403 and b"rq4.json" in data and b"importance churn" not in data, path
    finally:
        (runs[0] / "rq4.json").unlink()
        (root / "rq4.json").rename(runs[0] / "rq4.json")


def test_request_guards(served):
    url, _, _ = served
    assert request(url, "/api/runs", headers={"Host": "evil.example:80"})[0] == 400          # DNS rebinding
    assert request(url, "/api/live/0", "POST", b'{"prompt": "x"}', {"Content-Type": "text/plain"})[0] == 400
    assert live(url, 0, prompt="x" * 2001)[0] == 400
    assert live(url, 0, prompt="x", new_tokens=65)[0] == 400
    assert live(url, 0, prompt="x", evil=1)[0] == 400
    assert request(url, "/static/../serve_runs.py")[0] == 404
    status, page = request(url, "/")
    assert status == 200 and b"<script src=\"/static/app.js\"" in page
    assert request(url, "/api/runs/7/overview")[0] == 400


def test_live_known_answers(served):
    url, runs, _ = served
    assert json.loads(request(url, "/api/live/1/status")[1])["state"] == "idle"   # nothing loads before a prompt
    s, same = live(url, 1, prompt="Where is Paris?", new_tokens=6, top=5)
    assert s == 200, same
    assert same["kl"] == {"bt": 0.0, "tb": 0.0, "vocab": "full"}             # a model against itself
    base, tuned = same["columns"]
    assert base["continuation"] == tuned["continuation"] and base["top"] == tuned["top"]
    s, diff = live(url, 0, prompt="Where is Paris?", new_tokens=6, top=5)
    assert s == 200 and diff["kl"]["bt"] > 1e-4 and diff["kl"]["tb"] > 1e-4
    assert diff["columns"][0]["top"] == base["top"]                          # the same base model in both runs
    h = "L2_resid_post_diff_k2_steer"
    s, zero = live(url, 0, prompt="Where is Paris?", new_tokens=4, handle=h, alpha=0.0)
    assert s == 200 and zero["columns"][2]["kl_to_self"]["bt"] == 0.0
    assert zero["columns"][2]["continuation"] == zero["columns"][0]["continuation"]
    s, strong = live(url, 0, prompt="Where is Paris?", new_tokens=4, handle=h, alpha=50.0, k=1, layer=1)
    assert s == 200 and strong["columns"][2]["kl_to_self"]["bt"] > 1e-3
    assert "L1, k=1, strength 50" in strong["columns"][2]["label"]
    assert live(url, 0, prompt="x", handle=h, k=3)[0] == 400                 # the handle has 2 columns
    status = json.loads(request(url, "/api/live/0/status")[1])
    assert status["state"] == "ready"


def test_one_request_at_a_time(served):
    url, runs, _ = served
    sess = Sessions().for_manifest(json.loads((runs[1] / "manifest.json").read_text()))
    sess._run_lock.acquire()
    try:
        with pytest.raises(Busy):
            sess.ask(Ask(prompt="hi", new_tokens=0))
    finally:
        sess._run_lock.release()


@pytest.mark.real
def test_serve_a_real_rq1_run(planted_rq1):
    """A real RQ1 run on planted-cultural: its headline and Figure A series come through as written, and
    the live panel loads the pair the manifest names (real weights, CPU)."""
    run_dir = planted_rq1[0]
    url, server, thread = serve_in_thread(make_app([run_dir]))
    try:
        ov = json.loads(request(url, "/api/runs/0/overview")[1])
        rq1 = json.loads((run_dir / "rq1.json").read_text())
        assert {"stage": "rq1", "title": rq1["title"], "headline": rq1["headline"]} in ov["headlines"]
        a = ov["figures"]["A"]
        assert a["patch"]["layers"] == [r["layer"] for r in rq1["layers"]["evidence"]["per_layer"]]
        assert a["entry"] == rq1["layers"]["entry"] and a["planted"] == rq1["planted_layers"]
        s, d = live(url, 0, prompt="What do people eat at a wedding?", new_tokens=3, top=3)
        assert s == 200, d
        assert d["kl"]["bt"] > 0 and [c["side"] for c in d["columns"]] == ["base", "tuned"]
    finally:
        server.should_exit = True
        thread.join(10)


def test_shared_vocabulary_kl_matches_the_full_one_on_one_tokenizer(served):
    """The path for two tokenizers (KL over the shared vocabulary) gives the full-vocabulary KL when the
    tokenizers are the same (every string shared, ids in the same order)."""
    _, runs, _ = served
    from mechdiff.fairness import shared_vocab
    sess = Sessions().for_manifest(json.loads((runs[0] / "manifest.json").read_text()))
    q = Ask(prompt="Where is Paris?", new_tokens=0, top=3)
    full = sess.ask(q)["kl"]
    tb, tt = sess.models["base"].tokenizer, sess.models["tuned"].tokenizer
    sess._shared = shared_vocab(tb, tt)
    shared = sess.ask(q)["kl"]
    assert full["vocab"] == "full" and shared["vocab"] == "shared" and full["bt"] > 1e-4
    assert shared["bt"] == pytest.approx(full["bt"], rel=1e-4) and shared["tb"] == pytest.approx(full["tb"], rel=1e-4)

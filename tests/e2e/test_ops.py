"""The operator's view of a deployment: /metrics in Prometheus' text format during a real
training run (values equal to what the operations returned), the run history on disk across a
coordinator kill -9 and restart, and the page at /ops rendered by headless Chromium. Every
route needs an API key; an unauthenticated request is refused."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import service_client as sc
from service_client import adam, batch, datum, pb, types

KEY = "ops-test-key-0123456789"
PEAK = 1e12
LENGTHS = (7, 12, 5)
HTTP_TIMEOUT_S = 15
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    return batch([datum(*sc.random_sequence(rng, k)) for k in LENGTHS])


def _get(url: str, key: str | None = KEY, cookie: str | None = None) -> tuple[int, bytes, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if cookie:
        headers["Cookie"] = cookie
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _scrape(base: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of /metrics, parsed by prometheus_client."""
    status, body, headers = _get(base + "/metrics")
    assert status == 200, body[:500]
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _create(d: sc.Deployment, run_id: str) -> None:
    created = d.stub.CreateRun(pb.CreateRunRequest(run_id=run_id, lora=types.LoraConfig(rank=8, seed=3)),
                               metadata=d.metadata(), timeout=sc.RPC_TIMEOUT_S)
    sc.result(d.stub, created.init_op_id, metadata=d.metadata())


def _train(d: sc.Deployment, run_id: str, steps: int, first_seq: int = 1):
    """`steps` steps (forward_backward then optim_step): [(fb metrics, optim metrics)]."""
    out = []
    for i in range(steps):
        seq = first_seq + 2 * i
        fb = d.run_op(run_id, seq, forward_backward=_batch(seq))
        opt = d.run_op(run_id, seq + 1, optim_step=adam(learning_rate=1e-2))
        out.append((dict(fb.forward_backward.metrics), dict(opt.optim_step.metrics)))
    return out


def _active_parameters(model_dir: str, config: dict) -> int:
    """The matmul weights one token passes through, counted from the checkpoint's own tensors:
    every matrix but the embedding, routed experts' ones weighted by top-k / experts (the
    definition of N in docs/operations.md, "MFU")."""
    import glob
    from safetensors.numpy import load_file

    n = 0.0
    tensors = {}
    for path in glob.glob(os.path.join(model_dir, "*.safetensors")):
        tensors.update(load_file(path))
    for name, t in tensors.items():
        if t.ndim < 2 or name.endswith("embed_tokens.weight"):
            continue
        share = config["num_experts_per_tok"] / config["num_experts"] if ".mlp.experts." in name else 1.0
        n += t.size * share
    if "lm_head.weight" not in tensors:  # tied: the unembedding is the embedding's matrix
        n += config["vocab_size"] * config["hidden_size"]
    assert n == int(n)
    return int(n)


@pytest.fixture(scope="module")
def door(tmp_path_factory, build_dir, tiny_model):
    workdir = str(tmp_path_factory.mktemp("ops"))
    with sc.http_door(build_dir, tiny_model, workdir, KEY,
                      coordinator_args=["--peak_flops_per_device", str(PEAK)]) as (d, base):
        d.checkpoint_root = os.path.join(workdir, "checkpoints")  # where http_door puts them
        yield d, base


def test_metrics_equal_the_ops_own_outputs_during_training(door, tiny_model):
    d, base = door
    run = "metrics-run"
    _create(d, run)
    with open(os.path.join(tiny_model, "config.json")) as f:
        config = json.load(f)
    label = (("run", run),)
    tokens = 0.0
    for step in range(1, 4):
        (fb, opt), = _train(d, run, 1, first_seq=2 * step - 1)
        tokens += fb["num_tokens:sum"]
        m = _scrape(base)
        assert m[("lathe_run_step", label)] == step
        assert m[("lathe_run_loss_sum", label)] == fb["loss:sum"]
        assert m[("lathe_run_loss_tokens", label)] == fb["num_loss_tokens:sum"]
        assert m[("lathe_run_grad_norm", label)] == opt["grad_norm:mean"]
        assert m[("lathe_run_learning_rate", label)] == opt["learning_rate:mean"]
        assert m[("lathe_run_tokens_total", label)] == tokens
        assert m[("lathe_ops_total", (("op", "optim_step"), ("outcome", "done")))] >= step
        seconds = m[("lathe_run_step_seconds", label)]
        assert 0 < seconds < 60
        assert m[("lathe_run_tokens_per_second", label)] == pytest.approx(fb["num_tokens:sum"] / seconds, rel=1e-9)
        # MFU = (6 N T + 6 L q sum n^2) / (step time x peak x devices), N from config.json.
        n_active = _active_parameters(tiny_model, config)
        assert m[("lathe_model_active_parameters", (("model", "tiny"),))] == n_active
        hd = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        flops = 6 * n_active * sum(LENGTHS) + 6 * config["num_hidden_layers"] * config["num_attention_heads"] * hd \
            * sum(k * k for k in LENGTHS)
        assert m[("lathe_run_mfu", label)] == pytest.approx(flops / (seconds * PEAK * 4), rel=1e-9)
    # Latency histograms per op type, cumulative, +Inf bucket = count.
    fb_op = (("op", "forward_backward"),)
    count = m[("lathe_op_duration_seconds_count", fb_op)]
    assert count >= 3
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in m.items()
                     if k[0] == "lathe_op_duration_seconds_bucket" and dict(k[1])["op"] == "forward_backward")
    assert buckets[-1] == (math.inf, count) and all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    assert m[("lathe_op_duration_seconds_sum", fb_op)] > 0
    # The deployment: replicas, heartbeats, the queue, its state.
    for r in ("0", "1"):
        assert m[("lathe_replica_registered", (("host", os.uname().nodename), ("replica", r)))] == 1
        assert m[("lathe_replica_connected", (("replica", r),))] == 1
        assert 0 <= m[("lathe_replica_heartbeat_age_seconds", (("replica", r),))] < 3
    assert m[("lathe_deployment_state", (("state", "serving"),))] == 1
    assert m[("lathe_ledger_unfinished_ops", ())] == 0
    assert m[("lathe_peak_flops_per_device", ())] == PEAK
    # A save: the bytes the checkpoint holds on disk.
    d.run_op(run, 7, save_state=pb.SaveStateOp(name="ckpt"))
    listed = d.stub.ListCheckpoints(pb.ListCheckpointsRequest(run_id=run), metadata=d.metadata(),
                                    timeout=sc.RPC_TIMEOUT_S)
    size = sum(c.size_bytes for c in listed.checkpoints if c.id == f"lathe://{run}/weights/ckpt")
    assert size > 0
    assert _scrape(base)[("lathe_checkpoint_written_bytes_total", (("kind", "weights"),))] >= size
    # Sampling: three requests submitted together; their batch sizes as the replicas reported them.
    prompt = types.ModelInput()
    prompt.chunks.add().encoded_text.tokens = np.array([3, 1, 4, 1, 5], dtype="<i4").tobytes()
    md = d.metadata()
    ids = [d.stub.Submit(pb.SubmitRequest(run_id=run, seq_id=seq, sample=pb.SampleOp(
        prompt=prompt, num_samples=1, current_weights=True, params=pb.SamplingParams(max_tokens=4, seed=seq))),
        metadata=md, timeout=sc.RPC_TIMEOUT_S).op_id for seq in (8, 9, 10)]
    batched = [sc.result(d.stub, i, metadata=md).sample.batched_requests for i in ids]
    m = _scrape(base)
    assert m[("lathe_sampling_requests_in_flight", ())] == 0
    assert m[("lathe_sampling_batch_requests_count", ())] == 3
    assert m[("lathe_sampling_batch_requests_sum", ())] == sum(max(1, b) for b in batched)
    assert m[("lathe_ops_total", (("op", "sample"), ("outcome", "done")))] == 3


def test_metrics_and_page_refuse_requests_without_a_key(door):
    _, base = door
    for path in ("/metrics", "/ops", "/ops/api/runs", "/ops/api/deployment", "/ops/static/ops.js"):
        for key in (None, "wrong-key-0123456789"):
            status, body, _ = _get(base + path, key=key)
            assert status == 401, (path, key, status, body[:200])
            assert b"lathe_run" not in body and b"polyline" not in body
    status, body, _ = _get(base + "/ops/api/runs", key=None, cookie="lathe_api_key=wrong")
    assert status == 401
    status, body, _ = _get(base + "/ops/api/runs", key=None, cookie=f"lathe_api_key={KEY}")
    assert status == 200 and "runs" in json.loads(body)
    status, body, _ = _get(base + "/ops/api/runs/..%2Fx/history")
    assert status in (404, 422), body


def _history(root: str, run: str) -> list[dict]:
    with open(os.path.join(root, run, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_history_is_on_disk_and_survives_a_coordinator_kill9(make_deployment, tmp_path):
    root, port_file = str(tmp_path / "checkpoints"), str(tmp_path / "http_port")
    d = make_deployment("history", api_key=KEY, coordinator_env={"LATHE_API_KEYS": KEY},
                        coordinator_args=["--auth", "on", "--checkpoint_root", root, "--http_port", "0",
                                          "--http_port_file", port_file],
                        worker_args=["--checkpoint_root", root, "--reconnect_timeout_s", "90"]).start()
    run = "history-run"
    _create(d, run)
    before = _train(d, run, 2)
    lines = _history(root, run)
    assert [(x["type"], x["seq_id"], x["step"]) for x in lines] == \
        [("forward_backward", 1, 0), ("optim_step", 2, 1), ("forward_backward", 3, 1), ("optim_step", 4, 2)]
    assert lines[0]["metrics"]["loss:sum"] == before[0][0]["loss:sum"]
    assert lines[3]["metrics"]["grad_norm:mean"] == before[1][1]["grad_norm:mean"]
    assert all(x["op_id"] == f"{run}/{x['seq_id']}" and x["unix_ms"] > 0 for x in lines)
    assert lines[1]["tokens_per_s"] > 0 and lines[1]["step_seconds"] > 0
    for fb, opt in ((lines[0], lines[1]), (lines[2], lines[3])):  # a step spans its forward_backward
        assert opt["step_seconds"] >= fb["duration_s"], (fb, opt)
        assert opt["tokens_per_s"] == pytest.approx(fb["metrics"]["num_tokens:sum"] / opt["step_seconds"])

    d.kill_coordinator()
    assert len(_history(root, run)) == 4, "lines were lost with the coordinator"
    os.remove(port_file)
    d.restart_coordinator()
    with open(port_file) as f:
        base = f"http://127.0.0.1:{int(f.read())}"
    m = _scrape(base)  # the gauges pick up where the history ends
    assert m[("lathe_run_step", (("run", run),))] == 2
    assert m[("lathe_run_loss_sum", (("run", run),))] == before[1][0]["loss:sum"]
    assert m[("lathe_run_grad_norm", (("run", run),))] == before[1][1]["grad_norm:mean"]
    after = _train(d, run, 1, first_seq=5)
    lines = _history(root, run)
    assert [x["seq_id"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[4]["metrics"]["loss:sum"] == after[0][0]["loss:sum"] and lines[5]["step"] == 3
    status, body, _ = _get(base + f"/ops/api/runs/{run}/history")
    assert status == 200, body[:300]
    assert [p["seq_id"] for p in json.loads(body)["points"]] == [1, 2, 3, 4, 5, 6]
    # A deleted run's history stays, and the page lists it as ended.
    d.run_op(run, 7, delete_run=pb.DeleteRunOp())
    status, body, _ = _get(base + "/ops/api/runs")
    assert status == 200 and {"run_id": run, "state": "ended"}.items() <= json.loads(body)["runs"][0].items(), body
    status, body, _ = _get(base + f"/ops/api/runs/{run}/history")
    assert status == 200 and len(json.loads(body)["points"]) == 6


def _chromium():
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            binary = shutil.which(name)
            break
    else:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it)")
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not os.path.exists(driver):
        pytest.skip("chromedriver is not installed (Debian's chromium-driver; scripts/setup.sh installs it)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed in .venv (requirements-dev.txt)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.set_page_load_timeout(30)
    return browser


def test_page_renders_the_run_in_headless_chromium(door, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d, base = door
    run = "page-run"
    _create(d, run)
    steps = 4
    _train(d, run, steps)
    d.run_op(run, 2 * steps + 1, save_state=pb.SaveStateOp(name="page-ckpt"))
    browser = _chromium()
    try:
        browser.get(base + "/ops")  # no key yet: the login form
        assert browser.find_elements(By.ID, "key"), browser.page_source[:500]
        browser.find_element(By.ID, "key").send_keys("not-the-key")
        browser.find_element(By.ID, "sign-in").click()
        assert browser.find_elements(By.ID, "key") and not browser.find_elements(By.ID, "runs")
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "sign-in").click()
        wait = WebDriverWait(browser, 30)
        row = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, f'#runs tr[data-run="{run}"]'))
        row.click()
        wait.until(lambda b: b.find_element(By.ID, "run-id").text == run
                   and b.find_element(By.ID, "chart-grad-norm").get_attribute("data-points") == str(steps)
                   and "page-ckpt" in b.find_element(By.ID, "checkpoints").text)
        assert browser.find_element(By.ID, "chart-loss").get_attribute("data-points") == str(steps)
        assert browser.find_element(By.ID, "chart-tokens").get_attribute("data-points") == str(steps)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-grad-norm circle")) == steps
        cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, f'#runs tr[data-run="{run}"] td')]
        assert cells[:3] == [run, "live", str(steps)], cells
        assert "serving" in browser.find_element(By.ID, "model").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#replicas tbody tr")) == 2
        assert "node_rank 0" in browser.find_element(By.ID, "checkpoints").text
        shot = str(tmp_path / "ops_page.png")
        assert browser.save_screenshot(shot)
        with open(shot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("LATHE_OPS_SCREENSHOT"):
            shutil.copy(shot, os.environ["LATHE_OPS_SCREENSHOT"])
    finally:
        browser.quit()


def test_history_converts_to_tensorboard_event_files(door, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed in .venv (requirements-dev.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d, _ = door
    run = "tb-run"
    _create(d, run)
    steps = _train(d, run, 3)
    history = os.path.join(d.checkpoint_root, run, "history.jsonl")
    with open(history, "a") as f:
        f.write('{"op_id": "torn')  # a line cut by a crash is skipped
    logdir = str(tmp_path / "tb")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "history_to_tensorboard.py"), history,
                           "--logdir", logdir], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = EventAccumulator(os.path.join(logdir, run))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss_per_token")]
    want = [(i + 1, fb["loss:sum"] / fb["num_loss_tokens:sum"]) for i, (fb, _) in enumerate(steps)]
    assert [s for s, _ in loss] == [s for s, _ in want]
    assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(loss, want))
    grad = [(e.step, e.value) for e in events.Scalars("train/grad_norm")]
    assert grad == [(i + 1, pytest.approx(opt["grad_norm:mean"], rel=1e-6)) for i, (_, opt) in enumerate(steps)]
    assert len(events.Scalars("train/tokens_per_s")) == 3

"""Many concurrent clients: no result lost, none duplicated, every conflict refused.

Over gRPC and over the HTTP door (Tinker's REST API). 200 clients, each with its own connection and run, submit a stream of operations
(noops, forward_backward of one datum, optim_step) to a deployment of two replicas,
retry some submits with the same seq_id and request (the same op id must come back)
and send a conflicting request at some used seq_ids (ALREADY_EXISTS). ``load_bench``
checks every result and each run's optimizer step count at the end, and exits 1 on
any violation. The full-size run (1,000 ops per client) is bench/load.py.
"""

import json
import os
import subprocess

import service_client as sc

CLIENTS = 200
OPS = 40
TIMEOUT_S = 600
FLAGS = ["--retry_every=3", "--conflict_every=5", "--forward_backward_every=8", "--optim_every=10",
         "--op_timeout_s=300"]


def check(proc):
    assert proc.returncode == 0, f"load_bench exited {proc.returncode}:\n{proc.stderr[-4000:]}\n{proc.stdout}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ops"] == CLIENTS * OPS
    assert out["retries"] == CLIENTS * (OPS // 3)
    assert out["conflicts"] == CLIENTS * (OPS // 5)
    for key in ("lost", "duplicated", "conflict_accepted", "wrong_result", "submit_failed", "step_mismatch"):
        assert out[key] == 0, (key, out)


def test_concurrent_clients_lose_and_duplicate_nothing(make_deployment, build_dir):
    d = make_deployment("load", max_runs=CLIENTS, coordinator_args=["--max_queued", "4096"]).start()
    proc = subprocess.run([os.path.join(build_dir, "bench", "load_bench"), f"--address={d.address}",
                           f"--clients={CLIENTS}", f"--ops={OPS}", *FLAGS],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    check(proc)
    # The deployment still serves after the load.
    assert d.health().state == sc.Health.SERVING


def test_concurrent_http_clients_lose_and_duplicate_nothing(tmp_path_factory, build_dir, tiny_model):
    key = "tml-load"
    with sc.http_door(build_dir, tiny_model, str(tmp_path_factory.mktemp("load-http")), key, max_runs=CLIENTS,
                      coordinator_args=["--max_queued", "4096"]) as (d, url):
        proc = subprocess.run([os.path.join(build_dir, "bench", "load_bench"), f"--address={d.address}",
                               f"--http_url={url}", f"--api_key={key}", f"--clients={CLIENTS}", f"--ops={OPS}",
                               *FLAGS], capture_output=True, text=True, timeout=TIMEOUT_S)
        check(proc)
        assert d.health().state == sc.Health.SERVING

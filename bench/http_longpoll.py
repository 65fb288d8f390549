"""Many waiting retrieve_future long-polls on the HTTP door, and what they
cost the calls that must still be answered promptly.

For each --http_threads value: a deployment (tiny model, one dp_worker) with
the HTTP door on; a run with an operation held pending by a seq_id gap (a
optim_step at seq_id 2, none at 1; --gap_timeout_s keeps it waiting). --polls
clients each open a connection and long-poll retrieve_future on it, as
docs/http-api.md's measurement did. While they wait: GET /api/v1/healthz
every 20 ms on a fresh connection (what a probe does) and, once, a small
forward_backward submitted and retrieved over HTTP on another run. Then the
gap is filled over gRPC and the time for every poll to get its answer is
measured. The same calls are timed before the polls start (the baseline).
Reported: health p50/p99 idle and under the polls, the training op's time,
the coordinator's threads and RSS (idle, under the polls), the release time.
Loopback only, bounded: each poll is held at most the door's 30 s.

  .venv/bin/python bench/http_longpoll.py [--polls 500] [--threads 128,1024]
"""
import argparse
import collections
import http.client
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import http_roundtrip  # noqa: E402
import train_throughput as tt  # noqa: E402
from deployment import deployment, http_door_args, http_url, serving_run, stubs  # noqa: E402

HEALTH_TIMEOUT_S = 10.0
MEASURE_S = 12.0


def coordinator_pid(marker):
    """The pid of the lathe_coordinator whose command line names `marker`."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if "lathe_coordinator" in cmd and marker in cmd:
            return int(name)
    raise SystemExit("no lathe_coordinator process found")


def proc_status(pid):
    """(threads, RSS MiB) of process `pid`."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return int(fields["Threads"][0]), int(fields["VmRSS"][0]) / 1024


def call(netloc, method, path, body=None, timeout=HEALTH_TIMEOUT_S):
    """One request on a fresh connection: (status, body, seconds); status None on a timeout."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(netloc, timeout=timeout)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data, time.perf_counter() - start
    except OSError:
        return None, b"", time.perf_counter() - start
    finally:
        conn.close()


def health_latencies(netloc, seconds):
    """healthz every 20 ms for `seconds`: the latencies (s) and the count that timed out."""
    out, timeouts = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        status, _, took = call(netloc, "GET", "/api/v1/healthz")
        if status != 200:
            timeouts += 1
        out.append(took)
        time.sleep(0.02)
    return out, timeouts


def pct(samples, p):
    if not samples:
        return float("nan")
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] * 1e3


def train_op(netloc, run, seq_id, tokens):
    """A one-datum forward_backward submitted and retrieved over HTTP: seconds, or None."""
    body = {"model_id": run, "seq_id": seq_id, "forward_backward_input": {
        "loss_fn": "cross_entropy",
        "data": [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
                  "loss_fn_inputs": {"target_tokens": {"dtype": "int64", "data": tokens[1:]}}}]}}
    start = time.perf_counter()
    status, data, _ = call(netloc, "POST", "/api/v1/forward_backward", json.dumps(body).encode(), timeout=60)
    if status is None:
        return None  # no answer within 60 s
    if status != 200:
        raise SystemExit(f"forward_backward: {status} {data[:300]!r}")
    request = json.dumps({"request_id": json.loads(data)["request_id"]}).encode()
    while time.perf_counter() - start < 60:
        status, data, _ = call(netloc, "POST", "/api/v1/retrieve_future", request, timeout=60)
        if status is None:
            return None
        reply = json.loads(data)
        if reply.get("type") != "try_again":
            if "loss_fn_outputs" not in reply:
                raise SystemExit(f"forward_backward failed: {reply}")
            return time.perf_counter() - start
    return None


def measure(args, threads, model):
    with tempfile.TemporaryDirectory() as tmp:
        stubs(os.path.join(tmp, "stubs"))
        flags = http_door_args(tmp, f"--http_threads={threads}", "--gap_timeout_s=300", "--max_runs=2")
        with deployment(args.build_dir, model, {"replicas": "1"}, 1, tmp, coordinator_args=flags,
                        worker_args=["--max_runs=2"]) as address:
            stub, pb, types, held_run = serving_run(address, 4)
            created = stub.CreateRun(pb.CreateRunRequest(), timeout=60)
            train_run = created.run_id
            while stub.Retrieve(pb.RetrieveRequest(op_id=created.init_op_id, wait_ms=30000),
                                timeout=60).state == pb.RetrieveResponse.PENDING:
                pass
            netloc = http_url(tmp).split("//", 1)[1]
            pid = coordinator_pid(tmp)
            tokens = list(range(1, 17))
            idle_threads, idle_rss = proc_status(pid)
            idle, _ = health_latencies(netloc, 3)
            idle_train = train_op(netloc, train_run, 1, tokens)
            # The op the polls wait for: an optim_step at seq_id 2 while 1 is missing.
            held = stub.Submit(pb.SubmitRequest(run_id=held_run, seq_id=2,
                                                optim_step=types.AdamParams(learning_rate=1e-4)), timeout=10).op_id
            body = json.dumps({"request_id": held}).encode()
            answers = []
            lock = threading.Lock()
            started = threading.Barrier(args.polls + 1)

            def poll(i):
                conn = http.client.HTTPConnection(netloc, timeout=45)
                started.wait()
                time.sleep(i * args.stagger_ms / 1e3)  # clients' polls start over a short while, not at once
                try:
                    conn.request("POST", "/api/v1/retrieve_future", body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    reply = resp.read()
                    with lock:
                        answers.append((time.monotonic(), resp.status, json.loads(reply)))
                except OSError as e:
                    with lock:
                        answers.append((time.monotonic(), None, str(e)))
                finally:
                    conn.close()

            pollers = [threading.Thread(target=poll, args=(i,), daemon=True) for i in range(args.polls)]
            for t in pollers:
                t.start()
            started.wait()
            polls_started = time.monotonic()
            time.sleep(2.0 + args.polls * args.stagger_ms / 1e3)  # let every poll reach the door
            busy_threads, busy_rss = proc_status(pid)
            trained = []
            trainer = threading.Thread(target=lambda: trained.append(train_op(netloc, train_run, 2, tokens)))
            trainer.start()
            busy, timeouts = health_latencies(netloc, MEASURE_S)
            busy_threads2, busy_rss2 = proc_status(pid)
            trainer.join(timeout=70)
            train_took = trained[0] if trained else None
            early = collections.Counter(f"{a[1]} {a[2].get('type', '') if isinstance(a[2], dict) else a[2]}"
                                        for a in answers)
            # Fill the gap: every poll should now get the noop's result.
            release = time.monotonic()
            stub.Submit(pb.SubmitRequest(run_id=held_run, seq_id=1, noop=pb.NoopOp()), timeout=10)
            for t in pollers:
                t.join(timeout=max(1.0, polls_started + 75 - time.monotonic()))
            done = [a for a in answers if a[1] == 200 and a[2].get("type") != "try_again"]
            release_s = max((a[0] for a in done), default=float("nan")) - release
    return {"threads": threads, "idle_threads": idle_threads, "idle_rss": idle_rss,
            "busy_threads": max(busy_threads, busy_threads2), "busy_rss": max(busy_rss, busy_rss2),
            "idle_p50": pct(idle, 50), "idle_p99": pct(idle, 99), "idle_train_s": idle_train,
            "busy_p50": pct(busy, 50), "busy_p99": pct(busy, 99), "health_calls": len(busy),
            "health_timeouts": timeouts, "train_s": train_took, "answered_early": early,
            "answered": len(done), "release_s": release_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--polls", type=int, default=500)
    ap.add_argument("--stagger-ms", type=float, default=0.0, help="delay between two polls' starts")
    ap.add_argument("--threads", default="128,1024", help="--http_threads values to measure, comma-separated")
    tt.add_path_args(ap)
    args = ap.parse_args()
    model = http_roundtrip.tiny_model(args.build_dir)
    for threads in (int(t) for t in args.threads.split(",")):
        r = measure(args, threads, model)
        train = "no answer within 60 s" if r["train_s"] is None else f"{r['train_s'] * 1e3:.0f} ms"
        print(f"--http_threads {threads}, {args.polls} polls held: healthz p50 {r['busy_p50']:.1f} ms / p99 "
              f"{r['busy_p99']:.1f} ms ({r['health_calls']} calls, {r['health_timeouts']} over "
              f"{HEALTH_TIMEOUT_S:.0f} s; idle p50 {r['idle_p50']:.1f} / p99 {r['idle_p99']:.1f} ms); "
              f"forward_backward over HTTP {train} (idle {r['idle_train_s'] * 1e3:.0f} ms); "
              f"coordinator {r['busy_threads']} threads / {r['busy_rss']:.0f} MiB RSS (idle {r['idle_threads']} / "
              f"{r['idle_rss']:.0f} MiB); {r['answered']}/{args.polls} polls answered "
              f"{r['release_s'] * 1e3:.0f} ms after the gap was filled (answered before: {dict(r['answered_early']) or 'none'})",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())

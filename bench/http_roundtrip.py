"""The HTTP door's per-call overhead against gRPC, on the same deployment.

The call timed is the cheapest one that goes through the op ledger and back:
retrieving the result of a finished operation (the run's initialisation),
POST /api/v1/retrieve_future over HTTP against Retrieve over gRPC. Both
reach FrontEnd::Retrieve, find the op done and answer at once, so what
differs is the transport: HTTP/1.1 + JSON (cpp-httplib) against HTTP/2 +
protobuf (gRPC). get_info (FrontEnd::GetInfo, no future) is timed the same
way as a second pair. Submitting an operation is not: the HTTP door has no
noop, and every other op runs on the replicas, which would measure them.

Each side uses one connection for all its calls (an http.client keep-alive
connection; one gRPC channel), calls alternate, and the figure is the median
of N after 50 warm-up calls. Both clients are Python (http.client and
grpcio), so the ratio includes the clients' own costs.

  .venv/bin/python bench/http_roundtrip.py [--calls 3000] [--layout replicas=1]
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # noqa: E402
from deployment import deployment, http_door_args, http_url, serving_run, stubs  # noqa: E402

WARMUP = 50


def tiny_model(build_dir):
    path = os.path.join(tt.ROOT, "runs", "tiny-qwen3-moe")
    if not os.path.exists(os.path.join(path, "config.json")):
        subprocess.run([os.path.join(build_dir, "runtime", "lathe_sft"), "--make_tiny_model", path], check=True)
    return path


class HttpCaller:
    """POSTs JSON bodies on one keep-alive connection; counts the connections it opened."""

    def __init__(self, url):
        self.netloc = url.split("//", 1)[1]
        self.conn = None
        self.connects = 0

    def post(self, path, body):
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.netloc, timeout=30)
                self.connects += 1
            try:
                self.conn.request("POST", path, body, {"Content-Type": "application/json"})
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                if resp.status != 200:
                    raise SystemExit(f"{path}: {resp.status} {data[:300]!r}")
                return data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()  # the server closed an idle or used-up connection: reconnect once
                self.conn = None
        raise SystemExit(f"{path}: the connection kept closing")


def median_us(samples):
    return statistics.median(samples) * 1e6


def time_pairs(calls, a, b):
    """Alternates a() and b() `calls` times after WARMUP each; their medians in µs."""
    ta, tb = [], []
    for i in range(WARMUP + calls):
        start = time.perf_counter()
        a()
        mid = time.perf_counter()
        b()
        end = time.perf_counter()
        if i >= WARMUP:
            ta.append(mid - start)
            tb.append(end - mid)
    return median_us(ta), median_us(tb)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--layout", default="replicas=1")
    ap.add_argument("--http-args", default="", help="more lathe_coordinator flags, comma-separated")
    tt.add_path_args(ap)
    args = ap.parse_args()
    layout = dict(kv.split("=") for kv in args.layout.split(","))
    model = tiny_model(args.build_dir)
    with tempfile.TemporaryDirectory() as tmp:
        stubs(os.path.join(tmp, "stubs"))
        extra = [a for a in args.http_args.split(",") if a]
        with deployment(args.build_dir, model, layout, 1, tmp, coordinator_args=http_door_args(tmp, *extra)) as address:
            stub, pb, _, run = serving_run(address, 8)
            url = http_url(tmp)
            init_op = f"{run}/0"
            assert stub.Retrieve(pb.RetrieveRequest(op_id=init_op), timeout=10).state == pb.RetrieveResponse.DONE
            caller = HttpCaller(url)
            retrieve_body = json.dumps({"request_id": init_op}).encode()
            info_body = json.dumps({"model_id": run}).encode()
            http_retrieve = lambda: caller.post("/api/v1/retrieve_future", retrieve_body)  # noqa: E731
            grpc_retrieve = lambda: stub.Retrieve(pb.RetrieveRequest(op_id=init_op), timeout=10)  # noqa: E731
            http_info = lambda: caller.post("/api/v1/get_info", info_body)  # noqa: E731
            grpc_info = lambda: stub.GetInfo(pb.GetInfoRequest(run_id=run), timeout=10)  # noqa: E731
            health = lambda: stub.Health(pb.HealthRequest(), timeout=10)  # noqa: E731
            assert json.loads(http_retrieve())["model_id"] == run
            r_http, r_grpc = time_pairs(args.calls, http_retrieve, grpc_retrieve)
            i_http, i_grpc = time_pairs(args.calls, http_info, grpc_info)
            bare_grpc, _ = time_pairs(args.calls, health, lambda: None)
            connects = caller.connects
            calls = 2 * (WARMUP + args.calls) + 1
    print(f"retrieve of a finished op: HTTP {r_http:.0f} us vs gRPC {r_grpc:.0f} us: ratio {r_http / r_grpc:.2f}x "
          f"(median of {args.calls})")
    print(f"get_info: HTTP {i_http:.0f} us vs gRPC {i_grpc:.0f} us: ratio {i_http / i_grpc:.2f}x")
    print(f"bare gRPC unary call (Health) {bare_grpc:.0f} us; HTTP connections opened: {connects} for {calls} calls")


if __name__ == "__main__":
    sys.exit(main())

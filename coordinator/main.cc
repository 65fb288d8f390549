// lathe_coordinator: accepts training operations over gRPC and fans them out
// to the dp_worker replicas that dial in. SIGTERM/SIGINT: stop accepting,
// fail what is unfinished, tell the replicas to stop, exit 0.
#include <csignal>
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "coordinator/coordinator.h"
#include "http/http_door.h"
#include "presets/preset_table.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:7777", "host:port to serve on (port 0: any free port, printed)");
ABSL_FLAG(int, replicas, 1, "data-parallel replicas the deployment waits for");
ABSL_FLAG(int, max_runs, 1, "training runs held at once (must not exceed the workers' --max_runs)");
ABSL_FLAG(double, heartbeat_interval_s, 1.0, "how often replicas send heartbeats");
ABSL_FLAG(double, heartbeat_timeout_s, 10.0, "silence after which a replica is lost and its operations fail");
ABSL_FLAG(double, gap_timeout_s, 600.0, "how long an operation waits for a missing earlier seq_id");
ABSL_FLAG(double, result_ttl_s, 3600.0, "how long results stay retrievable after they finish");
ABSL_FLAG(int64_t, max_queued, 1024, "operations accepted but unfinished, over all runs");
ABSL_FLAG(double, op_timeout_s, 7200.0, "longest round trip of one operation to the replicas");
ABSL_FLAG(int, max_inflight_samples, 64,
          "sampling requests on the replicas at once (other operations: 4), so concurrent ones batch");
ABSL_FLAG(std::string, auth, "auto", "API keys: on, off, or auto (off on loopback, on otherwise)");
ABSL_FLAG(std::string, api_keys_file, "", "file of accepted API keys, one per line (also $LATHE_API_KEYS)");
ABSL_FLAG(std::string, worker_token_file, "",
          "file whose first line is the token replica leaders must present (else $LATHE_WORKER_TOKEN); required");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate (chain) to serve TLS with; needs --tls_key");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(bool, insecure_listen, false, "allow plaintext on an address other than loopback (trusted networks only)");
ABSL_FLAG(int64_t, max_request_bytes, lathe::coordinator::kDefaultMaxRequestBytes,
          "largest message accepted from a client or replica; larger ones fail with RESOURCE_EXHAUSTED");
ABSL_FLAG(std::string, checkpoint_root, "", "the workers' checkpoint folder (same path), for ListCheckpoints");
ABSL_FLAG(std::string, journal_dir, "",
          "folder of the journal that lets a restarted coordinator resume its runs and results; empty: "
          "<checkpoint_root>/.coordinator with --checkpoint_root, else none; off: none");
ABSL_FLAG(std::string, presets, "",
          "preset table served by GetCapabilities; empty: $LATHE_PRESETS, the installed or source-tree one");
ABSL_FLAG(std::string, port_file, "", "write the bound port to this file once serving");
ABSL_FLAG(int, http_port, -1, "serve Tinker's REST API on this port of --listen's host (0: any free port; -1: off)");
ABSL_FLAG(std::string, http_port_file, "", "write the HTTP door's bound port to this file once serving");
ABSL_FLAG(int, http_threads, 1024, "HTTP requests handled at once (each waiting retrieve_future holds one)");
ABSL_FLAG(double, peak_flops_per_device, 0,
          "peak FLOP/s of one device in the compute dtype, the denominator of lathe_run_mfu (e.g. 989e12 for an "
          "H100 SXM in bf16 dense); 0: no MFU");
ABSL_FLAG(absl::Duration, http_session_timeout, absl::Minutes(10),
          "a Tinker session silent this long ends (its heartbeat is answered 410); 0: never");

namespace {
volatile std::sig_atomic_t g_stop = 0;
void OnSignal(int) { g_stop = 1; }

void WritePort(const std::string& path, int port) {
  if (path.empty()) return;
  if (FILE* f = std::fopen(path.c_str(), "w"); f != nullptr) std::fprintf(f, "%d\n", port), std::fclose(f);
}

// The HTTP door on --listen's host. It serves plaintext only, so off
// loopback it needs --insecure_listen like the gRPC port without TLS.
absl::StatusOr<std::unique_ptr<lathe::http::HttpDoor>> StartHttp(const lathe::coordinator::CoordinatorOptions& o,
                                                                   int port, lathe::coordinator::FrontEnd* front_end,
                                                                   const lathe::coordinator::OpsView* ops) {
  if (!lathe::coordinator::IsLoopback(o.listen) && !o.insecure_listen) {
    return absl::FailedPreconditionError(
        "the HTTP door serves plaintext only: off loopback it needs --insecure_listen");
  }
  lathe::http::HttpOptions h;
  h.host = o.listen.substr(0, o.listen.rfind(':'));
  h.port = port;
  h.threads = absl::GetFlag(FLAGS_http_threads);
  h.session_timeout = absl::GetFlag(FLAGS_http_session_timeout);
  h.max_request_bytes = o.max_request_bytes;
  h.ops = ops;
  auto door = lathe::http::HttpDoor::Start(h, front_end);
  if (!door.ok()) return door.status();
  std::printf("lathe_coordinator serving HTTP on port %d\n", (*door)->port());
  std::fflush(stdout);
  WritePort(absl::GetFlag(FLAGS_http_port_file), (*door)->port());
  return door;
}
}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("lathe coordinator; --helpfull lists the flags");
  absl::ParseCommandLine(argc, argv);
  using namespace lathe::coordinator;
  absl::StatusOr<AuthMode> auth = ParseAuthMode(absl::GetFlag(FLAGS_auth));
  if (!auth.ok()) return std::fprintf(stderr, "lathe_coordinator: %s\n", auth.status().ToString().c_str()), 2;
  CoordinatorOptions o;
  o.listen = absl::GetFlag(FLAGS_listen);
  o.replicas = absl::GetFlag(FLAGS_replicas);
  o.service.max_runs = absl::GetFlag(FLAGS_max_runs);
  o.service.checkpoint_root = absl::GetFlag(FLAGS_checkpoint_root);
  o.heartbeat_interval = absl::Seconds(absl::GetFlag(FLAGS_heartbeat_interval_s));
  o.heartbeat_timeout = absl::Seconds(absl::GetFlag(FLAGS_heartbeat_timeout_s));
  o.ledger.gap_timeout = absl::Seconds(absl::GetFlag(FLAGS_gap_timeout_s));
  o.ledger.result_ttl = absl::Seconds(absl::GetFlag(FLAGS_result_ttl_s));
  o.ledger.max_unfinished = absl::GetFlag(FLAGS_max_queued);
  o.op_timeout = absl::Seconds(absl::GetFlag(FLAGS_op_timeout_s));
  o.max_inflight_samples = absl::GetFlag(FLAGS_max_inflight_samples);
  o.auth = *auth;
  o.api_keys_file = absl::GetFlag(FLAGS_api_keys_file);
  o.worker_token_file = absl::GetFlag(FLAGS_worker_token_file);
  o.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  o.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  o.insecure_listen = absl::GetFlag(FLAGS_insecure_listen);
  o.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  o.journal_dir = absl::GetFlag(FLAGS_journal_dir);
  o.peak_flops_per_device = absl::GetFlag(FLAGS_peak_flops_per_device);
  if (o.journal_dir.empty() && !o.service.checkpoint_root.empty()) o.journal_dir = o.service.checkpoint_root + "/.coordinator";
  if (o.journal_dir == "off") o.journal_dir.clear();
  std::string presets_path = absl::GetFlag(FLAGS_presets);
  if (presets_path.empty()) presets_path = lathe::presets::DefaultPresetsPath();
  if (!presets_path.empty()) {
    auto table = lathe::presets::LoadPresets(presets_path);
    if (!table.ok()) return std::fprintf(stderr, "lathe_coordinator: %s\n", table.status().ToString().c_str()), 2;
    for (const auto& p : *table) o.service.presets.push_back(lathe::presets::ToProto(p));
  }
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  absl::StatusOr<std::unique_ptr<Coordinator>> c = Coordinator::Start(o);
  if (!c.ok()) return std::fprintf(stderr, "lathe_coordinator: %s\n", c.status().ToString().c_str()), 1;
  std::printf("lathe_coordinator serving on port %d\n", (*c)->port());
  std::fflush(stdout);
  WritePort(absl::GetFlag(FLAGS_port_file), (*c)->port());
  std::unique_ptr<lathe::http::HttpDoor> http;
  if (int port = absl::GetFlag(FLAGS_http_port); port >= 0) {
    auto door = StartHttp(o, port, &(*c)->front_end(), &(*c)->ops());
    if (!door.ok()) return std::fprintf(stderr, "lathe_coordinator: %s\n", door.status().ToString().c_str()), 1;
    http = *std::move(door);
  }
  while (!g_stop) absl::SleepFor(absl::Milliseconds(100));
  (*c)->Shutdown("coordinator stopped by signal", absl::Seconds(5));
  if (http != nullptr) http->Stop();  // after the ledger closed: no poll still waits
  return 0;
}

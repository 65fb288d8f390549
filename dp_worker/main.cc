// dp_worker: one MPI rank of a lathe deployment. Every replica's first rank
// dials the coordinator; all ranks serve the replica's operations until
// SIGTERM (finish the operation in flight, deregister, exit 0).
#include <mpi.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <algorithm>
#include <cstdlib>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "dp_worker/serve.h"
#include "runtime/trainer.h"

ABSL_FLAG(std::string, coordinator, "127.0.0.1:7777", "host:port of the coordinator's ReplicaLink service");
ABSL_FLAG(std::string, model, "", "Hugging Face model folder (config.json + *.safetensors)");
ABSL_FLAG(std::string, base_model, "", "the model's name for clients; empty: the folder's name");
ABSL_FLAG(int, replicas, 0, "data-parallel replicas (0: 1); the world size is replicas x node_count x devices per node");
ABSL_FLAG(int, replica_index, -1,
          "run this job as replica i (0 … replicas-1) of a deployment whose replicas are separate jobs: the job's "
          "ranks are one node group, the cross-replica groups are Gloo groups formed through the coordinator, and the "
          "deployment survives the loss of a replica; -1: this job holds every replica");
ABSL_FLAG(std::string, gloo_hostname, "",
          "with --replica_index: the address (host name or IP of this machine) the cross-replica Gloo groups listen "
          "on and advertise; empty: the host name");
ABSL_FLAG(int, node_count, 0, "nodes per replica; 0: the preset's, else 1");
ABSL_FLAG(int, devices_per_node, 0, "ranks per node; 0: the preset's, else world size / (replicas x node_count)");
ABSL_FLAG(int, tp, 0, "tensor-parallel degree inside a node; 0: the preset's, else 1");
ABSL_FLAG(int, ep, 0, "expert-parallel degree inside a replica; 0: the preset's, else 1");
ABSL_FLAG(int, cp, 0, "context-parallel degree: ranks of a data group that split each sequence; 0: the preset's, else 1");
ABSL_FLAG(int64_t, max_seq_len, 0, "longest datum accepted; 0: the preset's, else the model's max_position_embeddings");
ABSL_FLAG(std::string, presets, "", "preset table (JSON); empty: $LATHE_PRESETS, the installed or source-tree presets/models.json");
ABSL_FLAG(bool, dry_run, false, "print each rank's place, node and device for the resolved layout, then exit");
ABSL_FLAG(int64_t, micro_batch_tokens, 0, "tokens per micro-batch; 0: sized for ~256 MiB of logits");
ABSL_FLAG(int64_t, logprob_chunk_tokens, 0,
          "tokens whose logprobs and losses are computed at once; 0: ~256 MiB of logits per chunk");
ABSL_FLAG(std::string, recompute, "auto",
          "recompute each layer in the backward (keeping only its input): auto (above 2048 tokens in a micro-batch), on, off");
ABSL_FLAG(std::string, dtype, "",
          "compute precision: float32, or bfloat16 (bf16 base weights and activations, fp32 adapters, master "
          "weights, optimizer state, norms and losses); empty: bfloat16 on GPU ranks, float32 on CPU ranks");
ABSL_FLAG(int, max_runs, 1, "training runs held at once (each keeps its own weights and optimizer)");
ABSL_FLAG(int, max_sample_rows, 64,
          "samples (sum of num_samples) of queued sampling requests decoded in one batch");
ABSL_FLAG(double, sample_batch_window_ms, 2,
          "how long a sampling batch waits after each arriving request for another before it starts");
ABSL_FLAG(int, collective_timeout_s, 600, "seconds a collective may wait for its peers before the replica fails");
ABSL_FLAG(int, connect_timeout_s, 300, "seconds to keep dialing the coordinator at start");
ABSL_FLAG(int, reconnect_timeout_s, 300,
          "after the coordinator's stream breaks, seconds to keep redialing it to register again (0: stop)");
ABSL_FLAG(int, coordinator_timeout_s, 300,
          "seconds of silence (no heartbeat, no task) after which the coordinator is taken for gone and the replica "
          "stops");
ABSL_FLAG(std::string, checkpoint_root, "", "folder (shared by every node) for checkpoints; empty: saving refused");
ABSL_FLAG(std::string, worker_token_file, "",
          "file whose first line is the coordinator's worker token (else $LATHE_WORKER_TOKEN); required");
ABSL_FLAG(std::string, tls_ca, "", "PEM root certificates to verify the coordinator's TLS with (else $LATHE_TLS_CA)");
ABSL_FLAG(int64_t, max_message_bytes, int64_t{65} << 20, "largest task accepted from the coordinator");

namespace {
std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop.store(true); }

// The worker token and, when given, the CA of the coordinator's TLS.
absl::Status ReadLinkCredentials(lathe::dp_worker::LinkOptions& link) {
  absl::StatusOr<std::string> token = lathe::dp_worker::ReadWorkerToken(absl::GetFlag(FLAGS_worker_token_file));
  if (!token.ok()) return token.status();
  link.worker_token = *token;
  std::string ca = absl::GetFlag(FLAGS_tls_ca);
  if (const char* env = std::getenv("LATHE_TLS_CA"); ca.empty() && env != nullptr) ca = env;
  if (ca.empty()) return absl::OkStatus();
  absl::StatusOr<std::string> pem = lathe::dp_worker::ReadPemFile(ca);
  if (!pem.ok()) return pem.status();
  link.tls_root_certs = *pem;
  return absl::OkStatus();
}
}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("lathe dp_worker: serves a replica's training operations; run under mpirun");
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  absl::ParseCommandLine(argc, argv);
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  lathe::dp_worker::ServeOptions o;
  o.executor.model_dir = absl::GetFlag(FLAGS_model);
  o.executor.micro_batch_tokens = absl::GetFlag(FLAGS_micro_batch_tokens);
  o.executor.logprob_chunk_tokens = absl::GetFlag(FLAGS_logprob_chunk_tokens);
  absl::StatusOr<lathe::runtime::Recompute> recompute = lathe::runtime::ParseRecompute(absl::GetFlag(FLAGS_recompute));
  if (!recompute.ok()) {
    std::fprintf(stderr, "dp_worker: --recompute: %s\n", recompute.status().ToString().c_str());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  o.executor.recompute = *recompute;
  // Checked here so a bad name stops every rank at once; the default
  // (empty) is resolved once the rank's device is known (ServeOptions::dtype).
  if (absl::StatusOr<lathe::runtime::Dtype> dtype = lathe::runtime::ParseDtype(absl::GetFlag(FLAGS_dtype), false);
      !dtype.ok()) {
    std::fprintf(stderr, "dp_worker: --dtype: %s\n", dtype.status().ToString().c_str());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  o.dtype = absl::GetFlag(FLAGS_dtype);
  o.executor.max_runs = absl::GetFlag(FLAGS_max_runs);
  o.executor.checkpoint_root = absl::GetFlag(FLAGS_checkpoint_root);
  o.link.coordinator = absl::GetFlag(FLAGS_coordinator);
  o.link.connect_timeout = absl::Seconds(absl::GetFlag(FLAGS_connect_timeout_s));
  o.link.coordinator_timeout = absl::Seconds(absl::GetFlag(FLAGS_coordinator_timeout_s));
  o.link.reconnect_timeout = absl::Seconds(absl::GetFlag(FLAGS_reconnect_timeout_s));
  if (absl::GetFlag(FLAGS_coordinator_timeout_s) <= 0 || absl::GetFlag(FLAGS_max_message_bytes) <= 0) {
    std::fprintf(stderr, "dp_worker: --coordinator_timeout_s and --max_message_bytes must be positive\n");
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  if (absl::GetFlag(FLAGS_reconnect_timeout_s) < 0) {
    std::fprintf(stderr, "dp_worker: --reconnect_timeout_s must not be negative (0: do not redial)\n");
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  o.link.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  if (absl::Status s = ReadLinkCredentials(o.link); !s.ok() && !absl::GetFlag(FLAGS_dry_run)) {
    std::fprintf(stderr, "dp_worker: %s\n", s.ToString().c_str());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  o.base_model = absl::GetFlag(FLAGS_base_model);
  o.layout.replicas = absl::GetFlag(FLAGS_replicas);
  o.layout.node_count = absl::GetFlag(FLAGS_node_count);
  o.layout.devices_per_node = absl::GetFlag(FLAGS_devices_per_node);
  o.layout.tp = absl::GetFlag(FLAGS_tp);
  o.layout.ep = absl::GetFlag(FLAGS_ep);
  o.layout.cp = absl::GetFlag(FLAGS_cp);
  o.layout.max_seq_len = absl::GetFlag(FLAGS_max_seq_len);
  o.presets_path = absl::GetFlag(FLAGS_presets);
  o.dry_run = absl::GetFlag(FLAGS_dry_run);
  o.collective_timeout = absl::Seconds(absl::GetFlag(FLAGS_collective_timeout_s));
  o.loop.control_timeout = o.collective_timeout;
  o.loop.max_sample_rows = absl::GetFlag(FLAGS_max_sample_rows);
  o.loop.sample_batch_window = absl::Milliseconds(absl::GetFlag(FLAGS_sample_batch_window_ms));
  o.executor.collective_timeout = o.collective_timeout;
  o.replica_index = absl::GetFlag(FLAGS_replica_index);
  if (o.replica_index < -1) {
    std::fprintf(stderr, "dp_worker: --replica_index must be -1 (every replica in this job) or a replica's index\n");
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  o.cross.hostname = absl::GetFlag(FLAGS_gloo_hostname);
  o.cross.connect_timeout = std::min(o.collective_timeout, absl::Minutes(1));
  absl::Status s = lathe::dp_worker::Serve(o, g_stop);
  if (!s.ok()) {
    std::fprintf(stderr, "dp_worker: %s\n", s.ToString().c_str());
    // A rank that leaves alone would leave its peers waiting: end the job.
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return 0;
}

// Mesh set-up, registration and the serving loop of one rank.
#include "dp_worker/serve.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "runtime/log.h"
#include "runtime/model_config.h"
#include "runtime/parallel_setup.h"
#include "runtime/status.h"

namespace lathe::dp_worker {
namespace {

lathe::v1::RegisterReplica Registration(const ServeOptions& o, const runtime::ModelConfig& config, int replica) {
  lathe::v1::RegisterReplica r;
  r.set_replica(replica);
  lathe::v1::Layout* layout = r.mutable_layout();
  layout->set_replicas(o.replicas);
  layout->set_node_count(o.node_count);
  layout->set_tp(o.tp);
  layout->set_ep(o.ep);
  lathe::v1::ModelSummary* model = r.mutable_model();
  std::string name = o.base_model;
  if (name.empty()) name = std::filesystem::path(o.executor.model_dir).lexically_normal().filename().string();
  if (name.empty()) name = std::filesystem::path(o.executor.model_dir).parent_path().filename().string();
  model->set_base_model(name);
  model->set_architecture(config.architecture);
  model->set_vocab_size(config.vocab_size);
  model->set_max_seq_len(o.executor.max_seq_len > 0 ? o.executor.max_seq_len : config.max_position_embeddings);
  r.set_pid(getpid());
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  r.set_host(host);
  return r;
}

}  // namespace

absl::StatusOr<std::string> ReadApiKey(const std::string& path) {
  if (path.empty()) {
    const char* env = std::getenv("LATHE_API_KEY");
    return std::string(env == nullptr ? "" : env);
  }
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read API key file ", path));
  std::string key;
  std::getline(in, key);
  while (!key.empty() && (key.back() == '\r' || key.back() == ' ')) key.pop_back();
  return key;
}

absl::Status Serve(const ServeOptions& options, const std::atomic<bool>& stop) {
  LATHE_ASSIGN_OR_RETURN(runtime::ModelConfig config, runtime::LoadModelConfig(options.executor.model_dir));
  LATHE_ASSIGN_OR_RETURN(auto ctx, runtime::MakeModelContext(options.executor.model_dir, options.replicas,
                                                             options.node_count, options.tp, options.ep,
                                                             options.collective_timeout));
  runtime::SetLogRank(ctx->place.rank, ctx->shape.world_size());
  ExecutorOptions executor_options = options.executor;
  lathe::v1::RegisterReplica registration = Registration(options, config, ctx->place.replica);
  executor_options.base_model = registration.model().base_model();
  OpExecutor executor(executor_options, ctx.get());
  if (ctx->replica->rank() != 0) return RunFollower(executor, *ctx->replica, options.loop);
  registration.mutable_layout()->set_devices_per_node(ctx->shape.devices_per_node);
  absl::StatusOr<std::unique_ptr<ReplicaLink>> link = ReplicaLink::Connect(options.link, registration);
  if (!link.ok()) {
    StopFollowers(*ctx->replica, options.loop).IgnoreError();
    return link.status();
  }
  LATHE_LOG(Info, "replica %d registered with %s", ctx->place.replica, options.link.coordinator);
  return RunLeader(**link, executor, *ctx->replica, stop, options.loop);
}

}  // namespace lathe::dp_worker

// Mesh set-up, registration and the serving loop of one rank.
#include "dp_worker/serve.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "dp_worker/link_store.h"
#include "dp_worker/model_flops.h"
#include "parallel/device.h"
#include "parallel/rank_info.h"
#include "presets/preset_table.h"
#include "runtime/device.h"
#include "core/log.h"
#include "core/model_config.h"
#include "runtime/parallel_setup.h"
#include "core/status.h"

namespace lathe::dp_worker {
namespace {

std::string BaseModelName(const ServeOptions& o) {
  std::string name = o.base_model;
  if (name.empty()) name = std::filesystem::path(o.executor.model_dir).lexically_normal().filename().string();
  if (name.empty()) name = std::filesystem::path(o.executor.model_dir).parent_path().filename().string();
  return name;
}

// The leader's pid and host, for the coordinator's diagnostics.
void SetSender(lathe::v1::RegisterReplica& r) {
  r.set_pid(getpid());
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  r.set_host(host);
}

lathe::v1::RegisterReplica Registration(const ServeOptions& o, const parallel::MeshShape& shape,
                                        const runtime::ModelConfig& config, int replica) {
  lathe::v1::RegisterReplica r;
  r.set_replica(replica);
  r.set_separate_job(o.replica_index >= 0);
  lathe::v1::Layout* layout = r.mutable_layout();
  layout->set_replicas(shape.replicas);
  layout->set_node_count(shape.node_count);
  layout->set_tp(shape.tp);
  layout->set_ep(shape.ep);
  layout->set_cp(shape.cp);
  lathe::v1::ModelSummary* model = r.mutable_model();
  model->set_base_model(BaseModelName(o));
  model->set_architecture(config.architecture);
  model->set_vocab_size(config.vocab_size);
  model->set_max_seq_len(o.executor.max_seq_len > 0 ? o.executor.max_seq_len : config.max_position_embeddings);
  model->set_max_lora_rank(config.hidden_size);
  model->set_active_parameters(ActiveParameters(config));
  model->set_attention_layers(AttentionLayers(config));
  model->set_attention_q_dim(config.q_dim());
  SetSender(r);
  return r;
}

// The preset table, or an empty one when none is found and the layout is explicit.
absl::StatusOr<std::vector<presets::Preset>> Presets(const ServeOptions& o) {
  std::string path = o.presets_path.empty() ? presets::DefaultPresetsPath() : o.presets_path;
  if (path.empty()) {
    if (o.layout.Explicit()) return std::vector<presets::Preset>();
    return absl::NotFoundError("no preset table found (--presets, $LATHE_PRESETS); give the layout explicitly");
  }
  return presets::LoadPresets(path);
}

// The mesh for this job: the preset's node group (or the flags), with
// devices_per_node from the world, which must match the preset's.
absl::StatusOr<presets::ResolvedLayout> Resolve(const ServeOptions& o, int world_size) {
  LATHE_ASSIGN_OR_RETURN(std::vector<presets::Preset> table, Presets(o));
  presets::LayoutRequest request = o.layout;
  request.model = BaseModelName(o);
  LATHE_ASSIGN_OR_RETURN(presets::ResolvedLayout layout, presets::ResolveLayout(table, request, false));
  parallel::MeshShape& s = layout.shape;
  if (o.replica_index >= s.replicas) {
    return absl::InvalidArgumentError(absl::StrFormat("--replica_index %d is outside the deployment's %d replicas",
                                                      o.replica_index, s.replicas));
  }
  // A job of its own holds one replica.
  const int job_replicas = o.replica_index >= 0 ? 1 : s.replicas;
  const int nodes = job_replicas * s.node_count;
  if (world_size % nodes != 0 || (s.devices_per_node > 0 && world_size != nodes * s.devices_per_node)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the job has %d ranks but the layout%s wants %s %d x node_count %d x %s devices per node",
        world_size, layout.preset ? " of preset " + layout.preset->base_model : "",
        o.replica_index >= 0 ? "(one replica per job, --replica_index) replicas" : "replicas", job_replicas,
        s.node_count, s.devices_per_node > 0 ? std::to_string(s.devices_per_node) : "N"));
  }
  s.devices_per_node = world_size / nodes;
  return layout;
}

std::string PlaceLine(const parallel::RankInfo& info, const parallel::DeviceChoice& device,
                      const parallel::ParallelContext& ctx, const presets::ResolvedLayout& layout,
                      int replica_index) {
  parallel::RankPlace p = ctx.place;
  if (replica_index >= 0) p.replica = replica_index;  // a job of its own: the mesh is one replica's
  return absl::StrFormat(
      "place rank=%d world_size=%d replica=%d node_rank=%d local_rank=%d tp_rank=%d cp_rank=%d ep_rank=%d device=%d "
      "layout=%dx%dx%d tp=%d cp=%d ep=%d max_seq_len=%d preset=%s source=%s host_node_rank=%d (%s)",
      info.rank, info.world_size, p.replica, p.node_rank, info.local_rank, p.tp_rank, p.cp_rank, p.ep_rank,
      device.index, ctx.shape.replicas, ctx.shape.node_count, ctx.shape.devices_per_node, ctx.shape.tp, ctx.shape.cp,
      ctx.shape.ep,
      layout.max_seq_len, layout.preset ? layout.preset->base_model : "none", info.source, info.node_rank,
      device.why);
}


// Tells the coordinator that replica `replica` cannot serve, and why, so
// that Health (and every client) learns it; best effort.
void ReportRefusal(const ServeOptions& o, int replica, const absl::Status& why) {
  lathe::v1::RegisterReplica r;
  r.set_replica(replica);
  r.set_refused(std::string(why.message()));
  SetSender(r);
  LinkOptions link = o.link;
  link.connect_timeout = std::min(link.connect_timeout, absl::Seconds(30));
  absl::Status s = ReplicaLink::Connect(link, r).status();
  LATHE_LOG(Info, "told the coordinator that replica %d refused to start (%s)", replica, s.message());
}

// Serve, with `report_as` set to the replica this rank speaks for until it
// registers (-1: none), so a failure before then reaches the coordinator.
absl::Status ServeReplica(const ServeOptions& options, const std::atomic<bool>& stop, int& report_as) {
  auto env = [](const char* name) -> const char* { return std::getenv(name); };
  LATHE_ASSIGN_OR_RETURN(parallel::RankInfo info, parallel::DiscoverRankInfo(env));
  report_as = info.rank == 0 ? 0 : -1;
  LATHE_ASSIGN_OR_RETURN(presets::ResolvedLayout layout, Resolve(options, info.world_size));
  const bool separate = options.replica_index >= 0;
  const int job_replicas = separate ? 1 : layout.shape.replicas;
  const int ranks_per_replica = info.world_size / job_replicas;
  report_as = info.rank % ranks_per_replica == 0 ? info.rank / ranks_per_replica + std::max(0, options.replica_index)
                                                 : -1;
  LATHE_ASSIGN_OR_RETURN(parallel::DeviceChoice device,
                         parallel::ChooseDevice(info, env, runtime::DetectedGpus()));
  const int compute_device = runtime::ComputeDevice(device);
  LATHE_ASSIGN_OR_RETURN(const runtime::Dtype dtype, runtime::ParseDtype(options.dtype, compute_device >= 0));
  const parallel::MeshShape& shape = layout.shape;
  LATHE_ASSIGN_OR_RETURN(runtime::ModelConfig config, runtime::LoadModelConfig(options.executor.model_dir));
  if (separate && compute_device >= 0) {
    return absl::UnimplementedError(
        "--replica_index (replicas as separate jobs) runs on CPU ranks only: the cross-replica Gloo groups carry "
        "host buffers");
  }
  LATHE_ASSIGN_OR_RETURN(auto ctx, runtime::MakeModelContext(options.executor.model_dir, job_replicas,
                                                             shape.node_count, shape.tp, shape.ep,
                                                             options.collective_timeout, shape.cp, compute_device));
  runtime::SetLogRank(ctx->place.rank, ctx->shape.world_size());
  const std::string place = PlaceLine(info, device, *ctx, layout, options.replica_index);
  if (options.dry_run) {
    std::printf("%s\n", place.c_str());
    std::fflush(stdout);
    return absl::OkStatus();
  }
  LATHE_LOG(Info, "%s; computing in %s", place, runtime::DtypeName(dtype));
  if (info.node_count > 1 && info.node_rank != ctx->place.node_rank) {
    LATHE_LOG(Warning, "the mesh puts this rank on node %d but it runs on the launcher's node %d: place ranks "
              "in blocks of %d per node (mpirun --map-by ppr:%d:node, srun --ntasks-per-node=%d)",
              ctx->place.node_rank, info.node_rank, shape.devices_per_node, shape.devices_per_node,
              shape.devices_per_node);
  }
  ExecutorOptions executor_options = options.executor;
  executor_options.max_seq_len = layout.max_seq_len;
  executor_options.device = compute_device;
  executor_options.dtype = dtype;
  executor_options.max_lora_rank = config.hidden_size;
  ServeOptions resolved = options;
  resolved.executor.max_seq_len = layout.max_seq_len;
  lathe::v1::RegisterReplica registration =
      Registration(resolved, shape, config, separate ? options.replica_index : ctx->place.replica);
  executor_options.base_model = registration.model().base_model();
  std::unique_ptr<LinkStore> store;
  std::unique_ptr<CrossReplicaGroups> groups;
  if (separate) {
    store = std::make_unique<LinkStore>(options.link);
    groups = std::make_unique<CrossReplicaGroups>(ctx.get(), store.get(), options.cross);
    executor_options.join = [g = groups.get()](const lathe::v1::Membership& m, bool* changed) {
      return g->Join(m, changed);
    };
    executor_options.cross_group = [g = groups.get()] { return g->group(); };
  }
  OpExecutor executor(executor_options, ctx.get());
  if (ctx->replica->rank() != 0) return RunFollower(executor, *ctx->replica, options.loop);
  registration.mutable_layout()->set_devices_per_node(ctx->shape.devices_per_node);
  report_as = -1;  // from here on the link itself tells the coordinator
  absl::StatusOr<std::unique_ptr<ReplicaLink>> link = ReplicaLink::Connect(options.link, registration);
  if (!link.ok()) {
    StopFollowers(*ctx->replica, options.loop).IgnoreError();
    return link.status();
  }
  LATHE_LOG(Info, "replica %d registered with %s", registration.replica(), options.link.coordinator);
  return RunLeader(**link, executor, *ctx->replica, stop, options.loop);
}

}  // namespace

absl::Status Serve(const ServeOptions& options, const std::atomic<bool>& stop) {
  int report_as = -1;
  absl::Status s = ServeReplica(options, stop, report_as);
  if (!s.ok() && report_as >= 0 && !options.dry_run) ReportRefusal(options, report_as, s);
  return s;
}

}  // namespace lathe::dp_worker

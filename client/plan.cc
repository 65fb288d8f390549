// Rank table and printing of `lathe plan`; the memory arithmetic is in
// plan_estimate.cc.
#include "client/plan.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lathe::client {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

void PrintRanks(const parallel::MeshShape& shape, int64_t num_experts) {
  std::printf("%6s %8s %10s %11s %8s %8s %8s  %s\n", "rank", "replica", "node_rank", "local_rank", "tp_rank",
              "cp_rank", "ep_rank", num_experts > 0 ? "experts" : "");
  const int64_t per_rank = num_experts / shape.ep;
  for (int rank = 0; rank < shape.world_size(); ++rank) {
    parallel::RankPlace p = parallel::PlaceOf(shape, rank);
    std::string experts;
    if (per_rank > 0) experts = absl::StrCat(p.ep_rank * per_rank, "-", (p.ep_rank + 1) * per_rank - 1);
    std::printf("%6d %8d %10d %11d %5d/%-2d %5d/%-2d %5d/%-2d  %s\n", rank, p.replica, p.node_rank, p.local_rank,
                p.tp_rank, shape.tp, p.cp_rank, shape.cp, p.ep_rank, shape.ep, experts.c_str());
  }
}

void PrintEnv(const presets::ResolvedLayout& l, const std::string& model) {
  const parallel::MeshShape& s = l.shape;
  std::printf("LATHE_PLAN_MODEL=%s\nLATHE_PLAN_PRESET=%s\nLATHE_PLAN_REPLICAS=%d\nLATHE_PLAN_NODE_COUNT=%d\n"
              "LATHE_PLAN_DEVICES_PER_NODE=%d\nLATHE_PLAN_TP=%d\nLATHE_PLAN_EP=%d\nLATHE_PLAN_CP=%d\n"
              "LATHE_PLAN_NODES=%d\nLATHE_PLAN_RANKS=%d\nLATHE_PLAN_MAX_SEQ_LEN=%lld\n",
              (l.preset ? l.preset->base_model : model).c_str(), l.preset ? "1" : "0", s.replicas, s.node_count,
              s.devices_per_node, s.tp, s.ep, s.cp, s.replicas * s.node_count, s.world_size(),
              static_cast<long long>(l.max_seq_len));
}

std::string DtypeLine(Dtype dtype) {
  if (dtype == Dtype::kFloat32) return "float32 weights and activations, as CPU ranks run";
  return "bfloat16 weights and activations; fp32 adapters, Adam, norms and logprobs";
}

// One line per device: the share of it the estimate takes, and the verdict.
bool PrintDevice(const MemoryEstimate& m, const std::string& name, double gib) {
  const bool fits = Fits(m, gib);
  std::printf("  %-20s %5.0f%% of %.0f GiB (%.1f GiB usable): %s\n", (name + ":").c_str(),
              100 * m.total() / (gib * kGiB), gib, kUsableFraction * gib, fits ? "fits" : "does NOT fit");
  return fits;
}

// Prints the estimate; returns the exit code (0 fits the target device, 3 not).
int PrintMemory(const MemoryEstimate& m, const PlanOptions& o, const parallel::MeshShape& s, int64_t max_seq_len) {
  const int64_t rank_tokens = (max_seq_len + s.cp - 1) / s.cp;
  std::printf("memory per device (%s; %s; one %lld-token sequence, %lld tokens per rank with cp %d):\n",
              o.lora_rank > 0 ? absl::StrCat("LoRA rank ", o.lora_rank).c_str() : "full fine-tuning",
              DtypeLine(o.dtype).c_str(), static_cast<long long>(max_seq_len), static_cast<long long>(rank_tokens),
              s.cp);
  const std::pair<const char*, double> terms[] = {{"weights", m.weights},
                                                  {"trainable state", m.trainable_state},
                                                  {"activations", m.activations},
                                                  {"gathered K/V", m.gathered_kv},
                                                  {"key selection", m.key_selection},
                                                  {"total", m.total()}};
  std::printf("  (base weights as the runtime holds them: a quantized checkpoint's FP8 or INT4 weights are "
              "dequantized to %s on load)\n", DtypeName(o.dtype));
  for (const auto& [name, bytes] : terms) std::printf("  %-16s %9.2f GiB\n", name, bytes / kGiB);
  const bool h100 = PrintDevice(m, kH100.name, kH100.gib);
  PrintDevice(m, kH200.name, kH200.gib);
  if (o.device_memory_gib <= 0) return h100 ? 0 : 3;
  return PrintDevice(m, absl::StrFormat("%g GiB device", o.device_memory_gib), o.device_memory_gib) ? 0 : 3;
}

// A config.json, or the one in a model folder.
absl::StatusOr<runtime::ModelConfig> LoadConfig(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) return runtime::LoadModelConfig(path);
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--config: cannot read ", path));
  std::stringstream text;
  text << in.rdbuf();
  absl::StatusOr<runtime::ModelConfig> c = runtime::ParseModelConfig(text.str());
  if (!c.ok()) return absl::InvalidArgumentError(absl::StrCat("--config ", path, ": ", c.status().message()));
  return c;
}

}  // namespace

int PlanCommand(const std::vector<presets::Preset>& table, const PlanOptions& o) {
  auto fail = [](const absl::Status& s) { return std::fprintf(stderr, "lathe plan: %s\n", s.ToString().c_str()), 1; };
  if (o.device_memory_gib < 0) return fail(absl::InvalidArgumentError("--device_memory_gib must not be negative"));
  absl::StatusOr<presets::ResolvedLayout> l = presets::ResolveLayout(table, o.layout, /*allow_unverified=*/true);
  if (!l.ok()) return fail(l.status());
  const parallel::MeshShape& s = l->shape;
  if (s.devices_per_node <= 0) {
    return fail(absl::InvalidArgumentError("give --devices_per_node for a model without a preset"));
  }
  // The model's config: --config, else the preset's (whose absence is explained).
  std::optional<runtime::ModelConfig> config;
  std::string no_config = "no preset and no --config";
  parallel::ModelDims dims;
  if (!o.config_path.empty()) {
    absl::StatusOr<runtime::ModelConfig> c = LoadConfig(o.config_path);
    if (!c.ok()) return fail(c.status());
    config = *std::move(c);
    dims = presets::DimsOf(*config);
  } else if (l->preset) {
    config = l->preset->config;
    no_config = l->preset->config_error;
    dims = l->preset->dims;
  } else {
    dims.num_experts = s.ep;  // nothing is known of the model: check the mesh alone
  }
  if (absl::Status v = parallel::ValidateMesh(s, s.world_size(), dims); !v.ok()) return fail(v);
  if (o.format == "env") return PrintEnv(*l, o.layout.model), 0;
  std::printf("plan: %s (%s)\n", o.layout.model.c_str(),
              !l->preset ? "no preset: explicit layout" : l->preset->verified ? "preset" : "preset, NOT verified: "
                                                                                          "lathe does not run it yet");
  std::printf("  %d replica(s) x %d node(s) x %d device(s) = %d ranks on %d nodes; tp %d, cp %d, ep %d; "
              "max_seq_len %lld\n",
              s.replicas, s.node_count, s.devices_per_node, s.world_size(), s.replicas * s.node_count, s.tp, s.cp,
              s.ep, static_cast<long long>(l->max_seq_len));
  PrintRanks(s, config ? config->num_experts : 0);
  if (!config) {
    std::printf("memory per device: no estimate: %s\n", no_config.c_str());
    return 0;
  }
  if (l->preset && !l->preset->estimate_as.empty() && o.config_path.empty()) {
    std::printf("parameters counted as %s's (see the preset's note)\n", l->preset->estimate_as.c_str());
  }
  absl::StatusOr<MemoryEstimate> m = EstimateMemory(*config, s, l->max_seq_len, o.lora_rank, o.dtype);
  if (!m.ok()) {
    std::printf("memory per device: no estimate: %s\n", std::string(m.status().message()).c_str());
    return 0;
  }
  return PrintMemory(*m, o, s, l->max_seq_len);
}

int ListPresetsCommand(const std::vector<presets::Preset>& table, const PlanOptions& o) {
  std::printf("%-46s %5s %7s %3s %3s %3s %7s %8s %9s %5s %5s\n", "base_model", "nodes", "devices", "tp", "cp", "ep",
              "seq_len", "verified", "GiB/dev", "H100", "H200");
  for (const presets::Preset& p : table) {
    const parallel::MeshShape shape{1, p.node_count, p.devices_per_node, p.tp, p.ep, p.cp};
    absl::StatusOr<MemoryEstimate> m = absl::FailedPreconditionError(p.config_error);
    if (p.config) m = EstimateMemory(*p.config, shape, p.max_seq_len, o.lora_rank, o.dtype);
    auto verdict = [&](double gib) { return !m.ok() ? "-" : Fits(*m, gib) ? "fits" : "no"; };
    std::string total = m.ok() ? absl::StrFormat("%.1f", m->total() / kGiB) : "-";
    std::printf("%-46s %5d %7d %3d %3d %3d %7lld %8s %9s %5s %5s\n", p.base_model.c_str(), p.node_count,
                p.devices_per_node, p.tp, p.cp, p.ep, static_cast<long long>(p.max_seq_len), p.verified ? "yes" : "no",
                total.c_str(), verdict(kH100.gib), verdict(kH200.gib));
  }
  return 0;
}

}  // namespace lathe::client

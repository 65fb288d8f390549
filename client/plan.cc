// Rank table and memory arithmetic of `lathe plan`.
#include "client/plan.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace lathe::client {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
// The runtime converts every checkpoint to fp32 on load and computes in fp32.
constexpr double kWeightBytes = 4;
constexpr double kActivationBytes = 4;
// Adam keeps m and v shaped (and typed) like the parameter; the gradient too.
// LoRA: the adapter's value, gradient, m, v. Full fine-tuning trains the fp32
// weights in place (no separate master copy): gradient, m, v on top.
constexpr double kLoraStateBytes = 16;
constexpr double kFullStateBytes = 12;
// Share of the device the estimate may fill before `plan` says it does not
// fit: what the estimate leaves out (the backward's transient buffers, the
// allocator's fragmentation, the CUDA and NCCL contexts) needs the rest.
constexpr double kUsableFraction = 0.9;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Parameters of one device's shard of the base model, and LoRA parameters
// of its shard at rank r (attention and MLP, experts included).
struct ShardParams {
  double base = 0;
  double lora = 0;
};

ShardParams Shard(const presets::ModelFacts& f, int tp, int ep, int r) {
  const int64_t h = f.hidden_size;
  const int64_t q = f.num_attention_heads * f.head_dim / tp;          // q / o width on this rank
  const int64_t kv = CeilDiv(f.num_key_value_heads, tp) * f.head_dim;  // KV replicated when fewer heads than tp
  const int64_t dense_layers = f.is_moe() ? f.first_dense_layers : f.num_hidden_layers;
  const int64_t moe_layers = f.num_hidden_layers - dense_layers;
  ShardParams s;
  const int64_t vocab = CeilDiv(f.vocab_size, tp);
  s.base += double(vocab) * h * (f.tie_word_embeddings ? 1 : 2);
  // lm_head's adapter (train_unembed, on the embedding when tied): A whole, B cut by vocabulary.
  s.lora += double(r) * (h + vocab);
  // Attention: q, k, v column-parallel (A replicated, B cut), o row-parallel (A cut, B replicated).
  s.base += f.num_hidden_layers * (2.0 * h * q + 2.0 * h * kv + 4.0 * h);
  s.lora += f.num_hidden_layers * double(r) * ((h + q) + 2 * (h + kv) + (q + h));
  const int64_t inter = f.intermediate_size / tp;
  s.base += dense_layers * 3.0 * h * inter;
  s.lora += dense_layers * double(r) * 3 * (h + inter);
  if (moe_layers > 0) {
    const double experts = double(f.num_experts) / ep;
    const int64_t shared = f.shared_experts * f.moe_intermediate_size / tp;
    s.base += moe_layers * (experts * 3.0 * h * f.moe_intermediate_size + double(h) * f.num_experts + 3.0 * h * shared);
    s.lora += moe_layers * double(r) * (experts * 3 * (h + f.moe_intermediate_size) + 3 * (h + shared));
  }
  return s;
}

// The runtime's defaults (runtime/trainer.h, client code links no runtime):
// recompute is on above this many tokens in a micro-batch, and logprobs are
// computed in chunks whose fp32 logits take about 256 MiB.
constexpr int64_t kRecomputeAutoTokens = 2048;
int64_t LogprobChunkTokens(int64_t vocab_size) {
  return std::clamp<int64_t>((int64_t{1} << 26) / vocab_size, 512, 16384);
}
// Factors measured on CPU (bench/memory_peak.py; BENCHMARKS.md "Peak memory
// of a long LoRA step"). The elements ActivationElementsPerToken counts are
// what the layer formulas name; autograd holds more (norm statistics, fp32
// copies, activation inputs, and during a layer's backward the gradients):
// 1.55-1.9x with every layer kept, 1.5-2.1x for one recomputed layer. A
// logprob chunk holds two [chunk, V/tp] buffers at a time (logits and
// log-softmax, then log-softmax and its gradient) plus the GEMMs' packing:
// 1.85-2.7 buffers measured.
constexpr double kAutogradFactor = 1.7;
constexpr double kChunkBuffers = 2.25;
// Beside the layer inputs: the final norm's input and output and the hidden
// states' gradient, [T, hidden] each.
constexpr double kHiddenBuffers = 3.0;

// Elements kept per token for backward: every layer's inputs and
// intermediates (no activation checkpointing), the last norm.
double ActivationElementsPerToken(const presets::ModelFacts& f, int tp) {
  const double h = f.hidden_size;
  const double q = double(f.num_attention_heads) * f.head_dim / tp;
  const double kv = double(CeilDiv(f.num_key_value_heads, tp)) * f.head_dim;
  // Norm in/out, q k v before and after norm+rope, attention output; no T x T scores.
  const double attention = 2 * h + 2 * (q + 2 * kv) + q;
  const int64_t dense_layers = f.is_moe() ? f.first_dense_layers : f.num_hidden_layers;
  const int64_t moe_layers = f.num_hidden_layers - dense_layers;
  // Norm in/out, gate, up, act(gate), act(gate)*up.
  const double dense = 2 * h + 4.0 * f.intermediate_size / tp;
  // Tokens are split over tp, each goes to k experts (input, gate, up, act, product) plus shared experts.
  const double moe = 2 * h + double(f.num_experts_per_tok) * (h + 4.0 * f.moe_intermediate_size) / tp +
                     4.0 * f.shared_experts * f.moe_intermediate_size / tp;
  return f.num_hidden_layers * attention + dense_layers * dense + moe_layers * moe + h;
}

// Elements per token of the widest single layer (what a recomputed layer's
// backward holds at once).
double LayerElementsPerToken(const presets::ModelFacts& f, int tp) {
  presets::ModelFacts one = f;
  const bool any_dense = !f.is_moe() || f.first_dense_layers > 0;
  one.num_hidden_layers = 1;
  one.first_dense_layers = 0;
  double widest = 0;
  if (f.is_moe()) widest = ActivationElementsPerToken(one, tp);
  if (any_dense) {
    one.num_experts = 0;
    widest = std::max(widest, ActivationElementsPerToken(one, tp));
  }
  return widest - f.hidden_size;  // less the final norm
}

// Bytes of activations of one `tokens`-token micro-batch, as the runtime
// keeps them with its default chunking and recompute.
double ActivationBytes(const presets::ModelFacts& f, int tp, int64_t tokens) {
  const double t = double(tokens);
  const double vocab = double(CeilDiv(f.vocab_size, tp));
  const double chunk = double(std::min<int64_t>(tokens, LogprobChunkTokens(f.vocab_size)));
  const double head = kChunkBuffers * kActivationBytes * chunk * vocab;
  const double h = double(f.hidden_size);
  if (tokens <= kRecomputeAutoTokens) {
    // Every layer's activations stay to the backward; the loss's chunk
    // buffers come on top of them.
    return kAutogradFactor * kActivationBytes * t * ActivationElementsPerToken(f, tp) + head;
  }
  // Recompute: each layer's input stays; one layer's activations and
  // gradients live at a time, or one logprob chunk's buffers.
  const double kept = kActivationBytes * t * h * (f.num_hidden_layers + kHiddenBuffers);
  const double layer = kAutogradFactor * kActivationBytes * t * LayerElementsPerToken(f, tp);
  return kept + std::max(layer, head);
}

}  // namespace

absl::StatusOr<MemoryEstimate> EstimateMemory(const presets::ModelFacts& f, const parallel::MeshShape& shape,
                                              int64_t max_seq_len, int lora_rank) {
  if (!f.Complete()) {
    return absl::FailedPreconditionError(
        "the preset's facts are incomplete (hidden, layers, heads, KV heads, head_dim, vocabulary, MLP widths)");
  }
  if (max_seq_len <= 0) return absl::InvalidArgumentError("max_seq_len must be positive");
  ShardParams p = Shard(f, shape.tp, shape.ep, lora_rank);
  MemoryEstimate m;
  m.weights = kWeightBytes * p.base;
  m.trainable_state = lora_rank > 0 ? kLoraStateBytes * p.lora : kFullStateBytes * p.base;
  m.activations = ActivationBytes(f, shape.tp, max_seq_len);
  return m;
}

namespace {

void PrintRanks(const parallel::MeshShape& shape, const presets::ModelFacts& facts) {
  std::printf("%6s %8s %10s %11s %8s %8s  %s\n", "rank", "replica", "node_rank", "local_rank", "tp_rank", "ep_rank",
              facts.is_moe() ? "experts" : "");
  const int64_t per_rank = facts.is_moe() ? facts.num_experts / shape.ep : 0;
  for (int rank = 0; rank < shape.world_size(); ++rank) {
    parallel::RankPlace p = parallel::PlaceOf(shape, rank);
    std::string experts;
    if (per_rank > 0) experts = absl::StrCat(p.ep_rank * per_rank, "-", (p.ep_rank + 1) * per_rank - 1);
    std::printf("%6d %8d %10d %11d %5d/%-2d %5d/%-2d  %s\n", rank, p.replica, p.node_rank, p.local_rank, p.tp_rank,
                shape.tp, p.ep_rank, shape.ep, experts.c_str());
  }
}

void PrintEnv(const presets::ResolvedLayout& l, const std::string& model) {
  const parallel::MeshShape& s = l.shape;
  std::printf("LATHE_PLAN_MODEL=%s\nLATHE_PLAN_PRESET=%s\nLATHE_PLAN_REPLICAS=%d\nLATHE_PLAN_NODE_COUNT=%d\n"
              "LATHE_PLAN_DEVICES_PER_NODE=%d\nLATHE_PLAN_TP=%d\nLATHE_PLAN_EP=%d\nLATHE_PLAN_NODES=%d\n"
              "LATHE_PLAN_RANKS=%d\nLATHE_PLAN_MAX_SEQ_LEN=%lld\n",
              (l.preset ? l.preset->base_model : model).c_str(), l.preset ? "1" : "0", s.replicas, s.node_count,
              s.devices_per_node, s.tp, s.ep, s.replicas * s.node_count, s.world_size(),
              static_cast<long long>(l.max_seq_len));
}

}  // namespace

int PlanCommand(const std::vector<presets::Preset>& table, const PlanOptions& o) {
  auto fail = [](const absl::Status& s) { return std::fprintf(stderr, "lathe plan: %s\n", s.ToString().c_str()), 1; };
  absl::StatusOr<presets::ResolvedLayout> l = presets::ResolveLayout(table, o.layout, /*allow_unverified=*/true);
  if (!l.ok()) return fail(l.status());
  const parallel::MeshShape& s = l->shape;
  if (s.devices_per_node <= 0) {
    return fail(absl::InvalidArgumentError("give --devices_per_node for a model without a preset"));
  }
  presets::ModelFacts facts = l->preset ? l->preset->facts : presets::ModelFacts();
  parallel::ModelDims dims = facts.Dims();
  // Without a preset nothing is known of the model: check the mesh alone.
  if (!l->preset) dims.num_experts = s.ep;
  if (absl::Status v = parallel::ValidateMesh(s, s.world_size(), dims); !v.ok()) return fail(v);
  if (o.format == "env") return PrintEnv(*l, o.layout.model), 0;
  std::printf("plan: %s (%s)\n", o.layout.model.c_str(),
              !l->preset ? "no preset: explicit layout" : l->preset->verified ? "preset" : "preset, NOT verified: "
                                                                                          "lathe does not run it yet");
  std::printf("  %d replica(s) x %d node(s) x %d device(s) = %d ranks on %d nodes; tp %d, ep %d; max_seq_len %lld\n",
              s.replicas, s.node_count, s.devices_per_node, s.world_size(), s.replicas * s.node_count, s.tp, s.ep,
              static_cast<long long>(l->max_seq_len));
  PrintRanks(s, facts);
  absl::StatusOr<MemoryEstimate> m = EstimateMemory(facts, s, l->max_seq_len, o.lora_rank);
  if (!m.ok()) {
    std::printf("memory per device: no estimate: %s\n", std::string(m.status().message()).c_str());
    return 0;
  }
  std::printf("memory per device (%s, fp32 weights and activations, one %lld-token sequence):\n",
              o.lora_rank > 0 ? absl::StrCat("LoRA rank ", o.lora_rank).c_str() : "full fine-tuning",
              static_cast<long long>(l->max_seq_len));
  std::printf("  %-16s %9.2f GiB\n  %-16s %9.2f GiB\n  %-16s %9.2f GiB\n", "weights", m->weights / kGiB,
              "trainable state", m->trainable_state / kGiB, "activations", m->activations / kGiB);
  const double usable = kUsableFraction * o.device_memory_gib;
  const bool fits = m->total() / kGiB <= usable;
  std::printf("  %-16s %9.2f GiB of %.1f GiB usable (%.0f%% of %.0f GiB): %s\n", "total", m->total() / kGiB,
              usable, 100 * kUsableFraction, o.device_memory_gib, fits ? "fits" : "does NOT fit");
  return fits ? 0 : 3;
}

int ListPresetsCommand(const std::vector<presets::Preset>& table) {
  std::printf("%-48s %5s %7s %3s %3s %8s  %s\n", "base_model", "nodes", "devices", "tp", "ep", "seq_len", "verified");
  for (const presets::Preset& p : table) {
    std::printf("%-48s %5d %7d %3d %3d %8lld  %s\n", p.base_model.c_str(), p.node_count, p.devices_per_node, p.tp,
                p.ep, static_cast<long long>(p.max_seq_len), p.verified ? "yes" : "no");
  }
  return 0;
}

}  // namespace lathe::client

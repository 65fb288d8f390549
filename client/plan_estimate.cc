// The memory arithmetic of `lathe plan` (EstimateMemory); each term's formula
// is written out in docs/launching.md, "The estimate".
#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/plan.h"

namespace lathe::client {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Bytes per element and per parameter for each dtype the runtime runs.
struct Bytes {
  double weight;      // a base weight (bf16: the working copy)
  double activation;  // a layer activation
  double lora_state;  // per adapter parameter: fp32 value, gradient, Adam m and v
  double full_state;  // per parameter of full fine-tuning beside `weight`
  bool fp32_extras;   // whether the fp32 pieces of a bf16 layer are counted apart
  // LoRA under bf16: each adapter's input is upcast to fp32 (as peft casts
  // it) and kept for its A's gradient (EstimateMemory sets it).
  bool adapter_inputs = false;
};

Bytes BytesOf(Dtype dtype) {
  if (dtype == Dtype::kFloat32) {
    // Full fine-tuning trains the fp32 weights in place: gradient, m, v.
    return {4, 4, 16, 12, false};
  }
  // bf16 working copy; an fp32 master copy, fp32 gradient, m and v beside it.
  return {2, 2, 16, 16, true};
}

// Logprobs and losses are fp32 in every dtype.
constexpr double kLogprobBytes = 4;
constexpr double kFp32Bytes = 4;

// Mirrors of the runtime's defaults (runtime/trainer.h; the client links no
// runtime): per-layer recompute is on above this many tokens of a rank's
// micro-batch, and logprobs are computed in chunks whose fp32 logits take
// about 256 MiB. Under context parallelism the estimate compares a rank's
// own T/cp tokens with the threshold (the runtime may count the whole
// sequence: recompute then starts earlier and the estimate is high).
constexpr int64_t kRecomputeAutoTokens = 2048;
int64_t LogprobChunkTokens(int64_t vocab_size) {
  return std::clamp<int64_t>((int64_t{1} << 26) / vocab_size, 512, 16384);
}

// Factors measured on CPU in fp32 (bench/memory_peak.py; BENCHMARKS.md "Peak
// memory of a long LoRA step"). The elements ActivationElementsPerToken
// counts are what the layer formulas name; autograd holds more (norm
// statistics, activation inputs, and during a layer's backward the
// gradients): 1.55-1.9x with every layer kept, 1.5-2.1x for one recomputed
// layer. A logprob chunk holds two [chunk, V/tp] buffers at a time (logits
// and log-softmax, then log-softmax and its gradient) plus the GEMMs'
// packing: 1.85-2.7 buffers measured. bf16 applies the same factors to its
// 2-byte elements and counts its fp32 pieces apart (Fp32ElementsPerToken).
constexpr double kAutogradFactor = 1.7;
constexpr double kChunkBuffers = 2.25;
// Beside the layer inputs: the final norm's input and output and the hidden
// states' gradient, [T, hidden] each.
constexpr double kHiddenBuffers = 3.0;

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

// Per-rank attention widths: q (and o) and k (or v).
double QWidth(const presets::ModelFacts& f, int tp) { return double(f.num_attention_heads) * f.head_dim / tp; }
double KvWidth(const presets::ModelFacts& f, int tp) {
  return double(CeilDiv(f.num_key_value_heads, tp)) * f.head_dim;
}

// Elements kept per token for backward: every layer's inputs and
// intermediates (no activation checkpointing), the last norm.
double ActivationElementsPerToken(const presets::ModelFacts& f, int tp) {
  const double h = f.hidden_size;
  const double q = QWidth(f, tp);
  const double kv = KvWidth(f, tp);
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

// fp32 elements per token a bf16 layer holds beside its bf16 ones: the two
// norms' upcast inputs (2 x hidden), the q and k norms' (q + kv), and in a
// MoE layer the router's logits and probabilities (2 x experts, 1/tp of the
// tokens per rank). With `adapter_copies` (LoRA): the adapters' fp32 inputs
// — the q/k/v input, o's, the MLP's (experts: k routed copies, 1/tp of the
// tokens) and down's — that many times: 1 kept for the backward, 2 in a
// layer's backward (the input and its gradient; measured on CPU:
// bench/memory_peak.py --dtype bfloat16).
double Fp32LayerElementsPerToken(const presets::ModelFacts& f, int tp, bool moe, int adapter_copies) {
  const double h = f.hidden_size;
  const double norms = 2.0 * h + QWidth(f, tp) + KvWidth(f, tp);
  double inputs = 0;
  if (adapter_copies > 0) {
    const double mlp = moe ? double(f.num_experts_per_tok) * (h + f.moe_intermediate_size) / tp +
                                 (f.shared_experts > 0 ? h + double(f.shared_experts) * f.moe_intermediate_size / tp : 0)
                           : h + double(f.intermediate_size) / tp;
    inputs = adapter_copies * (h + QWidth(f, tp) + mlp);
  }
  return norms + (moe ? 2.0 * f.num_experts / tp : 0) + inputs;
}

// The same for every layer, plus what is held once: the RoPE tables (cos and
// sin, head_dim each) and the final norm's upcast input.
double Fp32ElementsPerToken(const presets::ModelFacts& f, int tp, bool adapters) {
  const int64_t dense_layers = f.is_moe() ? f.first_dense_layers : f.num_hidden_layers;
  const int64_t moe_layers = f.num_hidden_layers - dense_layers;
  const int kept = adapters ? 1 : 0;
  // One layer's backward at a time adds its adapter inputs' gradients.
  const double backward = adapters ? Fp32LayerElementsPerToken(f, tp, moe_layers > 0, 1) -
                                         Fp32LayerElementsPerToken(f, tp, moe_layers > 0, 0)
                                   : 0;
  return dense_layers * Fp32LayerElementsPerToken(f, tp, false, kept) +
         moe_layers * Fp32LayerElementsPerToken(f, tp, true, kept) + backward +
         2.0 * f.head_dim + f.hidden_size;
}

// Elements per token of the widest single layer (what a recomputed layer's
// backward holds at once), and its fp32 elements under bf16.
struct LayerWidth {
  double elements = 0;
  double fp32 = 0;
};

LayerWidth WidestLayer(const presets::ModelFacts& f, int tp, bool adapters) {
  presets::ModelFacts one = f;
  const bool any_dense = !f.is_moe() || f.first_dense_layers > 0;
  one.num_hidden_layers = 1;
  one.first_dense_layers = 0;
  LayerWidth widest;
  if (f.is_moe()) widest = {ActivationElementsPerToken(one, tp), Fp32LayerElementsPerToken(f, tp, true, adapters ? 2 : 0)};
  if (any_dense) {
    one.num_experts = 0;
    widest.elements = std::max(widest.elements, ActivationElementsPerToken(one, tp));
    widest.fp32 = std::max(widest.fp32, Fp32LayerElementsPerToken(f, tp, false, adapters ? 2 : 0));
  }
  widest.elements -= f.hidden_size;  // less the final norm
  return widest;
}

bool Recomputes(int64_t rank_tokens) { return rank_tokens > kRecomputeAutoTokens; }

// Bytes of activations of this rank's `tokens`-token share of one sequence,
// as the runtime keeps them with its default chunking and recompute.
double ActivationBytes(const presets::ModelFacts& f, int tp, int64_t tokens, const Bytes& b) {
  const double t = double(tokens);
  const double vocab = double(CeilDiv(f.vocab_size, tp));
  const double chunk = double(std::min<int64_t>(tokens, LogprobChunkTokens(f.vocab_size)));
  const double head = kChunkBuffers * kLogprobBytes * chunk * vocab;
  const double h = double(f.hidden_size);
  if (!Recomputes(tokens)) {
    // Every layer's activations stay to the backward; the loss's chunk
    // buffers come on top of them.
    const double fp32 = b.fp32_extras ? kFp32Bytes * t * Fp32ElementsPerToken(f, tp, b.adapter_inputs) : 0;
    return kAutogradFactor * b.activation * t * ActivationElementsPerToken(f, tp) + fp32 + head;
  }
  // Recompute: each layer's input stays (and the RoPE tables); one layer's
  // activations and gradients live at a time, or one logprob chunk's buffers.
  const LayerWidth widest = WidestLayer(f, tp, b.adapter_inputs);
  const double tables = b.fp32_extras ? kFp32Bytes * t * 2.0 * f.head_dim : 0;
  const double kept = b.activation * t * h * (f.num_hidden_layers + kHiddenBuffers) + tables;
  const double layer = kAutogradFactor * b.activation * t * widest.elements +
                       (b.fp32_extras ? kFp32Bytes * t * widest.fp32 : 0);
  return kept + std::max(layer, head);
}

// cp > 1: each attention layer all-gathers the whole sequence's K and V
// (T x kv each, at this rank's KV width); its backward holds their gradients
// as long. With recompute one layer's live at a time; without, every layer's
// stay to the backward.
double GatheredKvBytes(const presets::ModelFacts& f, int tp, int cp, int64_t sequence, int64_t rank_tokens,
                       const Bytes& b) {
  if (cp <= 1) return 0;
  const double one_layer = 2.0 * b.activation * double(sequence) * KvWidth(f, tp);
  const double layers_kept = Recomputes(rank_tokens) ? 1 : double(f.num_hidden_layers);
  return (layers_kept + 1) * one_layer;
}

}  // namespace

absl::StatusOr<Dtype> ParseDtype(std::string_view name) {
  if (name == "bfloat16") return Dtype::kBfloat16;
  if (name == "float32") return Dtype::kFloat32;
  return absl::InvalidArgumentError(absl::StrCat("--dtype '", std::string(name), "': give bfloat16 or float32"));
}

const char* DtypeName(Dtype dtype) { return dtype == Dtype::kFloat32 ? "float32" : "bfloat16"; }

absl::StatusOr<MemoryEstimate> EstimateMemory(const presets::ModelFacts& f, const parallel::MeshShape& shape,
                                              int64_t max_seq_len, int lora_rank, Dtype dtype) {
  if (!f.Complete()) {
    return absl::FailedPreconditionError(
        "the preset's facts are incomplete (hidden, layers, heads, KV heads, head_dim, vocabulary, MLP widths)");
  }
  if (max_seq_len <= 0) return absl::InvalidArgumentError("max_seq_len must be positive");
  Bytes b = BytesOf(dtype);
  b.adapter_inputs = b.fp32_extras && lora_rank > 0;
  const int cp = std::max(shape.cp, 1);
  // Each cp rank holds its own ceil(T / cp) tokens of the sequence.
  const int64_t rank_tokens = CeilDiv(max_seq_len, cp);
  ShardParams p = Shard(f, shape.tp, shape.ep, lora_rank);
  MemoryEstimate m;
  m.weights = b.weight * p.base;
  m.trainable_state = lora_rank > 0 ? b.lora_state * p.lora : b.full_state * p.base;
  m.activations = ActivationBytes(f, shape.tp, rank_tokens, b);
  m.gathered_kv = GatheredKvBytes(f, shape.tp, cp, rank_tokens * cp, rank_tokens, b);
  return m;
}

bool Fits(const MemoryEstimate& estimate, double device_gib) {
  return estimate.total() <= kUsableFraction * device_gib * 1024.0 * 1024.0 * 1024.0;
}

}  // namespace lathe::client

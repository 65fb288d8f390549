// The memory arithmetic of `lathe plan` (EstimateMemory); each term's formula
// is written out in docs/launching.md, "The estimate".
#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/plan.h"
#include "params/model_table.h"

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

// The widths the activation formulas use, read off the config.
struct Facts {
  int64_t hidden_size = 0, num_hidden_layers = 0, num_attention_heads = 0, num_key_value_heads = 0, head_dim = 0;
  int64_t intermediate_size = 0, vocab_size = 0;
  int64_t num_experts = 0, num_experts_per_tok = 0, moe_intermediate_size = 0;
  int64_t shared_experts = 0;  // ungated shared experts, moe_intermediate_size wide each
  int64_t shared_expert_intermediate_size = 0;  // one sigmoid-gated shared expert this wide
  int64_t dense_layers = 0, moe_layers = 0, linear_layers = 0;
  int64_t linear_num_key_heads = 0, linear_num_value_heads = 0, linear_key_head_dim = 0, linear_value_head_dim = 0;
  bool attn_output_gate = false;
  runtime::LatentAttentionConfig latent;  // enabled(): latent attention (DeepSeek-V3's MLA)
  int64_t rope_dim = 0;  // width of the RoPE tables
  int64_t index_topk = 0;     // > 0: sparse attention (GLM-5's indexer)
  int64_t indexer_layers = 0;  // layers that run their own indexer

  int64_t linear_attention_layers() const { return linear_layers; }
  int64_t full_attention_layers() const { return num_hidden_layers - linear_layers; }
};

Facts FactsOf(const runtime::ModelConfig& c) {
  Facts f;
  f.hidden_size = c.hidden_size, f.num_hidden_layers = c.num_hidden_layers;
  f.num_attention_heads = c.num_attention_heads, f.num_key_value_heads = c.num_key_value_heads;
  f.head_dim = c.head_dim, f.intermediate_size = c.intermediate_size, f.vocab_size = c.vocab_size;
  f.num_experts = c.num_experts, f.num_experts_per_tok = c.num_experts_per_tok;
  f.moe_intermediate_size = c.moe_intermediate_size;
  if (c.num_experts > 0 && c.shared_expert.intermediate_size > 0) {
    if (c.shared_expert.sigmoid_gate) {
      f.shared_expert_intermediate_size = c.shared_expert.intermediate_size;
    } else {
      f.shared_experts = c.shared_expert.intermediate_size / std::max<int64_t>(c.moe_intermediate_size, 1);
    }
  }
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    (c.IsMoeLayer(i) ? f.moe_layers : f.dense_layers) += 1;
    f.linear_layers += c.IsLinearAttentionLayer(i) ? 1 : 0;
  }
  f.linear_num_key_heads = c.linear_attention.num_key_heads;
  f.linear_num_value_heads = c.linear_attention.num_value_heads;
  f.linear_key_head_dim = c.linear_attention.key_head_dim;
  f.linear_value_head_dim = c.linear_attention.value_head_dim;
  f.attn_output_gate = c.attn_output_gate;
  f.latent = c.latent_attention;
  f.rope_dim = c.rotary.rotary_dim > 0 ? c.rotary.rotary_dim : c.head_dim;
  f.index_topk = c.sparse_indexer.index_topk;
  for (size_t i = 0; i < c.sparse_indexer.selection_layer.size(); ++i) {
    f.indexer_layers += c.sparse_indexer.selection_layer[i] == int64_t(i) ? 1 : 0;
  }
  return f;
}

// Parameters of one device's shard of the base model (`frozen_fp32`: the
// fp32 buffers beside them), and LoRA parameters of its shard at rank r:
// the description's rows (params/) at the widest rank of each group.
struct ShardParams {
  double base = 0;
  double frozen = 0;  // never trained, in the dtype (a sparse-attention indexer)
  double frozen_fp32 = 0;
  double lora = 0;
};

ShardParams Shard(const params::ParamTable& table, int tp, int ep, int r, bool full_finetune) {
  const params::RankPlace widest{tp, tp - 1, ep, ep - 1, full_finetune};
  const params::RankCount n = params::CountRank(table, widest, r);
  return {n.weights, n.frozen, n.frozen_fp32, n.adapters};
}

// Per-rank widths of a Gated DeltaNet layer (its heads split over tp).
struct LinearWidths {
  double key_heads, value_heads, key_dim, value_dim, conv_dim;
};

LinearWidths LinearWidthsOf(const Facts& f, int tp) {
  LinearWidths w;
  w.key_heads = double(f.linear_num_key_heads) / tp;
  w.value_heads = double(f.linear_num_value_heads) / tp;
  w.key_dim = w.key_heads * f.linear_key_head_dim;
  w.value_dim = w.value_heads * f.linear_value_head_dim;
  w.conv_dim = 2 * w.key_dim + w.value_dim;
  return w;
}

// Per-rank attention widths: q (and o) and k (or v).
double QWidth(const Facts& f, int tp) { return double(f.num_attention_heads) * f.head_dim / tp; }
double KvWidth(const Facts& f, int tp) {
  return double(CeilDiv(f.num_key_value_heads, tp)) * f.head_dim;
}

// Latent attention's per-rank widths: its heads split over tp, each
// qk_head_dim wide for q and the expanded key, v_head_dim for the values.
struct LatentWidths {
  double heads, qk, v, nope, rope, q_rank, kv_rank;
};
LatentWidths LatentWidthsOf(const Facts& f, int tp) {
  const runtime::LatentAttentionConfig& a = f.latent;
  return {double(f.num_attention_heads) / tp, double(a.qk_head_dim()), double(a.v_head_dim),
          double(a.qk_nope_head_dim), double(a.qk_rope_head_dim), double(a.q_lora_rank), double(a.kv_lora_rank)};
}

// The widths of the K and V an attention layer all-gathers under cp, per
// token: GQA's KV heads, or latent attention's expanded per-head keys and
// values.
double GatheredKvWidth(const Facts& f, int tp) {
  if (!f.latent.enabled()) return 2 * KvWidth(f, tp);
  const LatentWidths w = LatentWidthsOf(f, tp);
  return w.heads * (w.qk + w.v);
}

// Elements per token latent attention keeps for backward (runtime/
// latent_attention.cc, prefill path): the norm's input and output; q_a's
// output and its norm's (when q is low-rank), q_b's (or q_proj's); kv_a's
// output [latent | rope key] and the latent's norm; kv_b's per-head [key |
// value]; the roped q and key parts; q, the expanded key, the values padded
// to qk (for the fused kernel) and the padded output as attention keeps
// them, [heads, qk] each; o's input (the output without its padding).
double LatentElements(const Facts& f, int tp) {
  const LatentWidths w = LatentWidthsOf(f, tp);
  const double h = f.hidden_size;
  const double padded = std::max(w.qk, w.v);
  return 2 * h + 2 * w.q_rank + w.heads * w.qk + (w.kv_rank + w.rope) + w.kv_rank + w.heads * (w.nope + w.v) +
         w.heads * w.rope + w.rope + 2 * w.heads * w.qk + 2 * w.heads * padded + w.heads * w.v;
}

// Width of the RoPE tables (cos and sin each): head_dim, or latent
// attention's rope part.
double RopeWidth(const Facts& f) { return f.latent.enabled() ? double(f.rope_dim) : double(f.head_dim); }

// The layers of each kind: token mixer (softmax or linear attention) and MLP
// (dense or MoE) vary independently.
struct LayerCounts {
  int64_t attention, linear, dense, moe;
};

LayerCounts CountLayers(const Facts& f) {
  return {f.full_attention_layers(), f.linear_attention_layers(), f.dense_layers, f.moe_layers};
}

// Elements per token a Gated DeltaNet core keeps for backward: the qkv
// projection, the conv's output and its SiLU, z, a and b, the gated norm's
// output (out_proj's input). Under cp the core runs on the whole sequence on
// every cp rank, so these count the sequence's tokens, not the rank's.
double LinearCoreElements(const Facts& f, int tp) {
  const LinearWidths w = LinearWidthsOf(f, tp);
  return 3 * w.conv_dim + 2 * w.value_dim + 2 * w.value_heads;
}

// Elements per token a token mixer keeps for backward (its norm included).
double MixerElements(const Facts& f, int tp, bool linear) {
  const double h = f.hidden_size;
  if (linear) return 2 * h + LinearCoreElements(f, tp);  // norm in/out, the core
  if (f.latent.enabled()) return LatentElements(f, tp);
  const double q = QWidth(f, tp);
  const double kv = KvWidth(f, tp);
  // Norm in/out, q k v before and after norm+rope, attention output; no T x T scores.
  // An output gate adds its projection, sigmoid and the gated product.
  return 2 * h + 2 * (q + 2 * kv) + q + (f.attn_output_gate ? 3 * q : 0);
}

// Elements per token an MLP keeps for backward (its norm included).
double MlpElements(const Facts& f, int tp, bool moe) {
  const double h = f.hidden_size;
  // Norm in/out, gate, up, act(gate), act(gate)*up.
  if (!moe) return 2 * h + 4.0 * f.intermediate_size / tp;
  // Tokens are split over tp, each goes to k experts (input, gate, up, act, product) plus shared experts;
  // a gated shared expert adds its gate's logit and sigmoid.
  return 2 * h + double(f.num_experts_per_tok) * (h + 4.0 * f.moe_intermediate_size) / tp +
         4.0 * f.shared_experts * f.moe_intermediate_size / tp +
         (f.shared_expert_intermediate_size > 0 ? 4.0 * f.shared_expert_intermediate_size / tp + 2 : 0);
}

// fp32 elements per token the chunked gated delta rule keeps for backward in
// a linear-attention layer, whatever the dtype (the recurrence runs in fp32):
// q and k expanded to the value heads and L2-normalised, v, beta, g and
// their chunked products (11 Hv·dk + 6 Hv·dv), the [64, 64] intra-chunk
// matrices per head (5 Hv·64) and the state carried between chunks,
// [Hv, dk, dv] per 64 tokens. Fitted to the tensors transformers 5.23's
// torch path (torch_chunk_gated_delta_rule) saves for backward: with the
// layer's other elements, 0.978-0.998 of the measured count over 11 shapes
// (bench/gdn_activations.py; BENCHMARKS.md, "Gated DeltaNet activations").
// Not multiplied by the autograd factor: it is what autograd keeps.
constexpr double kDeltaRuleChunk = 64;
double RecurrenceElements(const Facts& f, int tp) {
  const LinearWidths w = LinearWidthsOf(f, tp);
  const double dk = f.linear_key_head_dim;
  return 11 * w.value_heads * dk + 6 * w.value_dim + 5 * w.value_heads * kDeltaRuleChunk +
         w.value_heads * dk * f.linear_value_head_dim / kDeltaRuleChunk;
}

// Elements per token kept for backward: every layer's inputs and
// intermediates (no activation checkpointing), the last norm.
double ActivationElementsPerToken(const Facts& f, int tp) {
  const LayerCounts n = CountLayers(f);
  return n.attention * MixerElements(f, tp, false) + n.linear * MixerElements(f, tp, true) +
         n.dense * MlpElements(f, tp, false) + n.moe * MlpElements(f, tp, true) + f.hidden_size;
}

// fp32 elements per token a bf16 token mixer holds beside its bf16 ones:
// its norm's upcast input (h) and the q and k norms' (q + kv), or a linear
// layer's gated norm's (its value width). With `adapter_copies` (LoRA): the
// adapters' fp32 inputs — the q/k/v (or in_proj) input and o's (out_proj's)
// — that many times: 1 kept for the backward, 2 in a layer's backward (the
// input and its gradient; measured on CPU: bench/memory_peak.py --dtype bfloat16).
double MixerFp32(const Facts& f, int tp, bool linear, int adapter_copies) {
  const double h = f.hidden_size;
  if (!linear && f.latent.enabled()) {
    // The q_a and latent norms' upcast inputs; the adapters read the hidden
    // state (q_a or q_proj, kv_a) and o's input.
    const LatentWidths w = LatentWidthsOf(f, tp);
    return h + w.q_rank + w.kv_rank + adapter_copies * (h + w.heads * w.v);
  }
  const double out_input = linear ? LinearWidthsOf(f, tp).value_dim : QWidth(f, tp);
  const double norms = linear ? h + out_input : h + QWidth(f, tp) + KvWidth(f, tp);
  return norms + adapter_copies * (h + out_input);
}

// The same for an MLP: its norm's upcast input, in a MoE layer the router's
// logits and probabilities (2 x experts, 1/tp of the tokens per rank), and
// the adapters' inputs (experts: k routed copies, 1/tp of the tokens; and down's).
double MlpFp32(const Facts& f, int tp, bool moe, int adapter_copies) {
  const double h = f.hidden_size;
  double mlp = h + double(f.intermediate_size) / tp;
  if (moe) {
    mlp = double(f.num_experts_per_tok) * (h + f.moe_intermediate_size) / tp +
          (f.shared_experts > 0 ? h + double(f.shared_experts) * f.moe_intermediate_size / tp : 0) +
          (f.shared_expert_intermediate_size > 0 ? 2 * h + double(f.shared_expert_intermediate_size) / tp : 0);
  }
  return h + (moe ? 2.0 * f.num_experts / tp : 0) + adapter_copies * mlp;
}

// The same for every layer, plus what is held once: the RoPE tables (cos and
// sin, head_dim each) and the final norm's upcast input.
double Fp32ElementsPerToken(const Facts& f, int tp, bool adapters) {
  const LayerCounts n = CountLayers(f);
  const int kept = adapters ? 1 : 0;
  // One layer's backward at a time adds its adapter inputs' gradients.
  double backward = 0;
  if (adapters) {
    auto mixer = [&](bool linear) { return MixerFp32(f, tp, linear, 1) - MixerFp32(f, tp, linear, 0); };
    const double widest_mixer = std::max(n.attention > 0 ? mixer(false) : 0.0, n.linear > 0 ? mixer(true) : 0.0);
    backward = widest_mixer + MlpFp32(f, tp, n.moe > 0, 1) - MlpFp32(f, tp, n.moe > 0, 0);
  }
  return n.attention * MixerFp32(f, tp, false, kept) + n.linear * MixerFp32(f, tp, true, kept) +
         n.dense * MlpFp32(f, tp, false, kept) + n.moe * MlpFp32(f, tp, true, kept) + backward +
         2.0 * RopeWidth(f) + f.hidden_size;
}

// Elements per token of the widest single layer (what a recomputed layer's
// backward holds at once), its fp32 elements under bf16, and its recurrence's
// fp32 elements (in any dtype).
struct LayerWidth {
  double elements = 0;
  double fp32 = 0;
  double recurrence = 0;
};

// `whole`: the GDN core's tokens per rank token (cp under context
// parallelism, where the core runs on the whole sequence; else 1).
LayerWidth WidestLayer(const Facts& f, int tp, bool adapters, double whole) {
  const LayerCounts n = CountLayers(f);
  const int copies = adapters ? 2 : 0;
  LayerWidth widest;
  double widest_bytes = -1;
  for (bool linear : {false, true}) {
    if ((linear ? n.linear : n.attention) == 0) continue;
    for (bool moe : {false, true}) {
      if ((moe ? n.moe : n.dense) == 0) continue;
      LayerWidth w{MixerElements(f, tp, linear) + MlpElements(f, tp, moe) +
                       (linear ? (whole - 1) * LinearCoreElements(f, tp) : 0),
                   MixerFp32(f, tp, linear, copies) + MlpFp32(f, tp, moe, copies),
                   linear ? whole * RecurrenceElements(f, tp) : 0};
      // Compared in bf16 bytes; the widest in one dtype is the widest in the other but for rounding.
      const double bytes = kAutogradFactor * 2 * w.elements + kFp32Bytes * (w.fp32 + w.recurrence);
      if (bytes > widest_bytes) {
        widest = w;
        widest_bytes = bytes;
      }
    }
  }
  return widest;
}

bool Recomputes(int64_t rank_tokens) { return rank_tokens > kRecomputeAutoTokens; }

// Bytes of activations of this rank's `tokens`-token share of one sequence,
// as the runtime keeps them with its default chunking and recompute.
// `sequence`: the whole sequence's tokens, which the Gated DeltaNet cores
// run on (more than `tokens` under cp).
double ActivationBytes(const Facts& f, int tp, int64_t tokens, int64_t sequence, const Bytes& b) {
  const double t = double(tokens);
  const double whole = double(std::max(sequence, tokens));
  const double linear_layers = double(f.linear_attention_layers());
  const double vocab = double(CeilDiv(f.vocab_size, tp));
  const double chunk = double(std::min<int64_t>(tokens, LogprobChunkTokens(f.vocab_size)));
  const double head = kChunkBuffers * kLogprobBytes * chunk * vocab;
  const double h = double(f.hidden_size);
  if (!Recomputes(tokens)) {
    // Every layer's activations stay to the backward; the loss's chunk
    // buffers come on top of them.
    const double fp32 = b.fp32_extras ? kFp32Bytes * t * Fp32ElementsPerToken(f, tp, b.adapter_inputs) : 0;
    const double recurrence = kFp32Bytes * whole * linear_layers * RecurrenceElements(f, tp);
    const double core_beyond = (whole - t) * linear_layers * LinearCoreElements(f, tp);
    return kAutogradFactor * b.activation * (t * ActivationElementsPerToken(f, tp) + core_beyond) + fp32 +
           recurrence + head;
  }
  // Recompute: each layer's input stays (and the RoPE tables); one layer's
  // activations and gradients live at a time, or one logprob chunk's buffers.
  const LayerWidth widest = WidestLayer(f, tp, b.adapter_inputs, t > 0 ? whole / t : 1.0);
  const double tables = b.fp32_extras ? kFp32Bytes * t * 2.0 * RopeWidth(f) : 0;
  const double kept = b.activation * t * h * (f.num_hidden_layers + kHiddenBuffers) + tables;
  const double layer = kAutogradFactor * b.activation * t * widest.elements +
                       (b.fp32_extras ? kFp32Bytes * t * widest.fp32 : 0) + kFp32Bytes * t * widest.recurrence;
  return kept + std::max(layer, head);
}

// cp > 1: each attention layer all-gathers the whole sequence's K and V
// (T x kv each, at this rank's KV width); its backward holds their gradients
// as long. With recompute one layer's live at a time; without, every layer's
// stay to the backward.
double GatheredKvBytes(const Facts& f, int tp, int cp, int64_t sequence, int64_t rank_tokens,
                       const Bytes& b) {
  if (cp <= 1) return 0;
  const double one_layer = b.activation * double(sequence) * GatheredKvWidth(f, tp);
  const double layers_kept = Recomputes(rank_tokens) ? 1 : double(f.full_attention_layers());
  return (layers_kept + 1) * one_layer;
}

// Sparse attention (runtime/sparse_indexer.h) on a sequence longer than
// index_topk: each indexer layer's selection, the int32 positions of every
// query's index_topk keys (the rank's queries: an upper bound, a cp chunk
// ending within the first index_topk positions keeps none), stays for the
// whole step (the layers sharing it, and their recompute, read it). Each
// attention call builds one sequence's or cp chunk's bool mask from it
// (counted as one layer's masks), which SDPA turns into an additive bias in
// the activation dtype and keeps for its backward (one layer's at a time
// with recompute, every attention layer's without). Without cp the mask is
// [T, T]; under cp a rank's two chunks i and 2cp-1-i of T/2cp queries each
// see the keys up to their ends, (i+1) and (2cp-i) chunks: T/2cp · T ·
// (2cp+1)/2cp elements on every rank. The scores are computed in blocks of
// 2^26 fp32 values (256 MiB) without autograd.
double KeySelectionBytes(const Facts& f, int cp, int64_t sequence, int64_t rank_tokens, const Bytes& b) {
  if (f.index_topk <= 0 || sequence <= f.index_topk) return 0;
  constexpr double kIndexBytes = 4;  // int32
  const double indices = double(f.indexer_layers) * double(rank_tokens) * double(f.index_topk) * kIndexBytes;
  const double keys_seen = cp > 1 ? double(2 * cp + 1) / double(4 * cp) : 1.0;
  const double mask = double(rank_tokens) * double(sequence) * keys_seen;
  const double biases = Recomputes(rank_tokens) ? 1 : double(f.full_attention_layers());
  constexpr double kScoreBlockBytes = double(int64_t{1} << 26) * kFp32Bytes;
  return indices + mask + biases * b.activation * mask + kScoreBlockBytes;
}

}  // namespace

absl::StatusOr<Dtype> ParseDtype(std::string_view name) {
  if (name == "bfloat16") return Dtype::kBfloat16;
  if (name == "float32") return Dtype::kFloat32;
  return absl::InvalidArgumentError(absl::StrCat("--dtype '", std::string(name), "': give bfloat16 or float32"));
}

const char* DtypeName(Dtype dtype) { return dtype == Dtype::kFloat32 ? "float32" : "bfloat16"; }

absl::StatusOr<MemoryEstimate> EstimateMemory(const runtime::ModelConfig& config, const parallel::MeshShape& shape,
                                              int64_t max_seq_len, int lora_rank, Dtype dtype) {
  if (max_seq_len <= 0) return absl::InvalidArgumentError("max_seq_len must be positive");
  absl::StatusOr<params::ParamTable> table = params::DescribeModel(config);
  if (!table.ok()) return absl::FailedPreconditionError(table.status().message());
  const Facts f = FactsOf(config);
  Bytes b = BytesOf(dtype);
  b.adapter_inputs = b.fp32_extras && lora_rank > 0;
  const int cp = std::max(shape.cp, 1);
  // Each cp rank holds its own ceil(T / cp) tokens of the sequence.
  const int64_t rank_tokens = CeilDiv(max_seq_len, cp);
  const ShardParams p = Shard(*table, shape.tp, shape.ep, lora_rank, lora_rank == 0);
  MemoryEstimate m;
  m.weights = b.weight * (p.base + p.frozen) + kFp32Bytes * p.frozen_fp32;
  m.trainable_state = lora_rank > 0 ? b.lora_state * p.lora : b.full_state * p.base;
  m.activations = ActivationBytes(f, shape.tp, rank_tokens, cp > 1 ? max_seq_len : rank_tokens, b);
  m.gathered_kv = GatheredKvBytes(f, shape.tp, cp, rank_tokens * cp, rank_tokens, b);
  m.key_selection = KeySelectionBytes(f, cp, rank_tokens * cp, rank_tokens, b);
  return m;
}

bool Fits(const MemoryEstimate& estimate, double device_gib) {
  return estimate.total() <= kUsableFraction * device_gib * 1024.0 * 1024.0 * 1024.0;
}

}  // namespace lathe::client

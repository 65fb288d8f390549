// The parameter rows of each block type lathe builds layers from, named
// under a module prefix ("model.layers.3.self_attn"). Each runtime block
// loads exactly these tensors (tests/params/describe_load_test.cc holds
// the two together).
#ifndef LATHE_PARAMS_BLOCKS_H_
#define LATHE_PARAMS_BLOCKS_H_

#include <cstdint>
#include <string>

#include "core/model_config.h"
#include "params/param_table.h"

namespace lathe::params {

// An RMSNorm weight `name` of `width` (whole on every rank).
ParamTable DescribeNorm(const std::string& role, const std::string& name, int64_t width);

// A linear layer `module` of [out, in] cut by `cut`, with its adapter in
// `group` (none for kNone).
ParamTable DescribeLinear(const std::string& role, const std::string& module, int64_t out, int64_t in, Cut cut,
                          Group group, int64_t unit = 1);

// Grouped-query softmax attention (runtime/attention.h): q/k/v/o, with an
// output gate (q rows doubled), q/k norms and biases as `d` says.
struct GqaDims {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0;
  bool qk_norm = false, output_gate = false, qkv_bias = false, o_bias = false;
};
ParamTable DescribeGqa(const std::string& prefix, const GqaDims& d);

// Multi-head latent attention (runtime/latent_attention.h): q_a/q_b (or
// q_proj), kv_a, kv_b, o and the two latent norms; adapters on the
// projections from the hidden state and on o.
ParamTable DescribeLatentAttention(const std::string& prefix, int64_t hidden, int64_t heads,
                                   const runtime::LatentAttentionConfig& config);

// Gated DeltaNet (runtime/linear_attention.h): in_proj_qkv (adapted as
// in_proj_q/k/v), z, b, a, the conv, dt_bias, A_log, the gated norm, out_proj.
ParamTable DescribeGatedDeltaNet(const std::string& prefix, int64_t hidden,
                                 const runtime::LinearAttentionConfig& config);

// DeepSeek sparse attention's indexer (runtime/sparse_indexer.h) under
// `prefix` ("model.layers.3.self_attn.indexer"): wq_b, wk, the k_norm
// LayerNorm's weight and bias and weights_proj, whole on every rank and
// never trained (kFrozen, no adapter).
ParamTable DescribeSparseIndexer(const std::string& prefix, int64_t hidden, int64_t q_lora_rank, int64_t heads,
                                 int64_t head_dim);

// A SwiGLU MLP of width `inter` (runtime/ffn.h).
ParamTable DescribeSwiGlu(const std::string& prefix, int64_t hidden, int64_t inter);

// A MoE layer's router ("gate") and expert bank ("experts.gate_proj",
// "experts.up_proj", "experts.down_proj") of `experts` experts.
ParamTable DescribeRouterAndExperts(const std::string& prefix, int64_t experts, int64_t hidden, int64_t inter);

// Softmax-routed experts (runtime/ffn.h's RoutedExperts) and, when
// shared_inter > 0, a sigmoid-gated shared expert ("shared_expert.*",
// "shared_expert_gate").
ParamTable DescribeRoutedExperts(const std::string& prefix, int64_t hidden, int64_t experts, int64_t inter,
                                 int64_t shared_inter);

// Sigmoid-routed experts (runtime/sigmoid_moe.h): the router, its fp32
// correction bias ("gate.e_score_correction_bias"), the experts and, when
// shared_inter > 0, the ungated shared experts ("shared_experts.*").
ParamTable DescribeSigmoidExperts(const std::string& prefix, int64_t hidden, int64_t experts, int64_t inter,
                                  int64_t shared_inter);

}  // namespace lathe::params

#endif  // LATHE_PARAMS_BLOCKS_H_

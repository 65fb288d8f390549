// The MFU's model facts: matmul weights per token of a hybrid MoE layout.
#include "dp_worker/model_flops.h"

#include <gtest/gtest.h>

namespace lathe::dp_worker {
namespace {

// h 8, vocab 10; layer 0 Gated DeltaNet, layer 1 softmax attention with an
// output gate; every layer MoE (4 experts, top 2, width 6) with a gated
// shared expert of width 5.
runtime::ModelConfig Hybrid() {
  runtime::ModelConfig c;
  c.hidden_size = 8;
  c.vocab_size = 10;
  c.num_hidden_layers = 2;
  c.layer_types = {runtime::LayerType::kLinearAttention, runtime::LayerType::kFullAttention};
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 4;
  c.attn_output_gate = true;
  c.linear_attention = {.num_key_heads = 1, .num_value_heads = 2, .key_head_dim = 4, .value_head_dim = 4,
                        .conv_kernel_size = 4};
  c.num_experts = 4;
  c.num_experts_per_tok = 2;
  c.moe_intermediate_size = 6;
  c.shared_expert = {.intermediate_size = 5, .sigmoid_gate = true};
  return c;
}

TEST(ModelFlopsTest, CountsWhatATokenPassesThrough) {
  const int64_t unembed = 8 * 10;
  const int64_t gated_delta_net = 8 * (2 * 4 + 2 * 8) + 8 * 2 * 2 + 8 * 8;  // qkvz, ba, out
  const int64_t attention = 8 * 16 + 2 * 8 * 4 + 8 * 8;                    // q+gate, k, v, o
  const int64_t moe = 8 * 4 + 2 * 3 * 8 * 6 + 3 * 8 * 5 + 8;               // router, 2 experts, shared + gate
  EXPECT_EQ(ActiveParameters(Hybrid()), unembed + gated_delta_net + attention + 2 * moe);
  EXPECT_EQ(AttentionLayers(Hybrid()), 1);
}

TEST(ModelFlopsTest, DenseLayersCountTheirMlp) {
  runtime::ModelConfig c = Hybrid();
  c.layer_types.clear();
  c.attn_output_gate = false;
  c.num_experts = 0;
  c.intermediate_size = 12;
  EXPECT_EQ(ActiveParameters(c), 8 * 10 + 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 12));
  EXPECT_EQ(AttentionLayers(c), 2);
}

}  // namespace
}  // namespace lathe::dp_worker

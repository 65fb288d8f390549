// GLM-5 (runtime/archs/glm_moe_dsa.cc): DeepSeek-V3's layers whose latent
// attention carries a sparse-attention indexer in each "full" layer
// ("shared" layers reuse an earlier layer's choice and hold none).
#include "params/archs/registry.h"
#include "params/blocks.h"

namespace lathe::params {

ParamTable DescribeGlmMoeDsaLayers(const runtime::ModelConfig& c, const std::string& prefix) {
  const runtime::SparseIndexerConfig& x = c.sparse_indexer;
  return DescribePreNormLayers(
      c, prefix,
      [&](int64_t layer, const std::string& p) {
        ParamTable t =
            DescribeLatentAttention(p + "self_attn", c.hidden_size, c.num_attention_heads, c.latent_attention);
        if (x.selection_layer.at(layer) == layer) {
          t.Append(DescribeSparseIndexer(p + "self_attn.indexer", c.hidden_size, c.latent_attention.q_lora_rank,
                                         x.index_n_heads, x.index_head_dim));
        }
        return t;
      },
      [&](const std::string& mlp) {
        return DescribeSigmoidExperts(mlp, c.hidden_size, c.num_experts, c.moe_intermediate_size,
                                      c.shared_expert.intermediate_size);
      });
}

}  // namespace lathe::params

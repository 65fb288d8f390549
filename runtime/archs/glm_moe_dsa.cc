// GLM-5 (GlmMoeDsaForCausalLM): DeepSeek-V3's layers (latent attention,
// dense first layers, sigmoid-routed experts with shared experts) whose
// attention is sparse: each query sees only the index_topk earlier keys an
// indexer selects, in "full" layers their own indexer's choice, in "shared"
// layers that of the previous full layer. Runs under tp, ep and cp.
#include "runtime/archs/registry.h"
#include "runtime/latent_attention.h"
#include "runtime/sigmoid_moe.h"
#include "core/status.h"

namespace lathe::runtime {
namespace {

SparseIndexerShape IndexerOf(const ModelConfig& c) {
  const SparseIndexerConfig& x = c.sparse_indexer;
  return {c.hidden_size, c.latent_attention.q_lora_rank, x.index_n_heads, x.index_head_dim,
          c.latent_attention.qk_rope_head_dim, x.index_topk};
}

}  // namespace

absl::StatusOr<std::vector<std::unique_ptr<Block>>> LoadGlmMoeDsaLayers(const ModelConfig& c, ParamLoader& loader,
                                                                        const std::string& prefix,
                                                                        const ModelShard& shard) {
  const SigmoidRouterShape router = SigmoidRouterOf(c);
  const SparseIndexerShape indexer = IndexerOf(c);
  return LoadPreNormLayers(
      c, loader, prefix, shard,
      [&](int64_t layer, const std::string& p) -> absl::StatusOr<std::unique_ptr<Mixer>> {
        LATHE_ASSIGN_OR_RETURN(std::unique_ptr<LatentAttention> a,
                               LatentAttention::Load(loader, p + "self_attn", c.hidden_size, c.num_attention_heads,
                                                     c.latent_attention, shard));
        LATHE_RETURN_IF_ERROR(a->SelectKeys(loader, p + "self_attn.indexer", indexer, layer,
                                            c.sparse_indexer.selection_layer.at(layer), shard));
        return std::unique_ptr<Mixer>(std::move(a));
      },
      [&](const std::string& mlp) -> absl::StatusOr<std::unique_ptr<Ffn>> {
        return SigmoidRoutedExperts::Load(loader, mlp, router, shard);
      });
}

}  // namespace lathe::runtime

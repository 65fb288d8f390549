// LoadPreNormLayers: the layer loop the architecture files share.
#include "absl/strings/str_cat.h"
#include "params/blocks.h"
#include "runtime/archs/registry.h"
#include "runtime/ffn.h"
#include "core/status.h"

namespace lathe::runtime {

absl::StatusOr<std::vector<std::unique_ptr<Block>>> LoadPreNormLayers(const ModelConfig& c, ParamLoader& loader,
                                                                      const std::string& prefix,
                                                                      const ModelShard& shard,
                                                                      const LoadMixerFn& load_mixer,
                                                                      const LoadFfnFn& load_routed) {
  const int64_t h = c.hidden_size;
  const bool offset = c.norm_style == NormStyle::kOnePlusWeight;
  const RouterShape router{h, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob,
                           c.shared_expert.intermediate_size};
  std::vector<std::unique_ptr<Block>> blocks;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat(prefix, "layers.", i, ".");
    Norm input{at::Tensor(), c.rms_norm_eps, offset}, post{at::Tensor(), c.rms_norm_eps, offset};
    params::ParamTable norm_rows = params::DescribeNorm("input_layernorm", p + "input_layernorm.weight", h);
    norm_rows.Append(params::DescribeNorm("post_attention_layernorm", p + "post_attention_layernorm.weight", h));
    DescribedLoader norms(loader, std::move(norm_rows), shard);
    LATHE_ASSIGN_OR_RETURN(input.weight, norms.Tensor("input_layernorm"));
    LATHE_ASSIGN_OR_RETURN(std::unique_ptr<Mixer> mixer, load_mixer(i, p));
    LATHE_ASSIGN_OR_RETURN(post.weight, norms.Tensor("post_attention_layernorm"));
    std::unique_ptr<Ffn> ffn;
    if (c.IsMoeLayer(i) && load_routed) {
      LATHE_ASSIGN_OR_RETURN(ffn, load_routed(p + "mlp"));
    } else if (c.IsMoeLayer(i)) {
      LATHE_ASSIGN_OR_RETURN(ffn, RoutedExperts::Load(loader, p + "mlp", router, shard));
    } else {
      LATHE_ASSIGN_OR_RETURN(ffn, SwiGluMlp::Load(loader, p + "mlp", h, c.intermediate_size, shard));
    }
    blocks.push_back(std::make_unique<Block>(std::move(input), std::move(mixer), std::move(post), std::move(ffn)));
  }
  return blocks;
}

}  // namespace lathe::runtime

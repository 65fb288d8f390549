// DescribePreNormLayers: the layer loop the architecture descriptions share.
#include "absl/strings/str_cat.h"
#include "params/archs/registry.h"
#include "params/blocks.h"

namespace lathe::params {

ParamTable DescribePreNormLayers(const runtime::ModelConfig& c, const std::string& prefix,
                                 const DescribeMixerFn& mixer, const DescribeFfnFn& routed) {
  ParamTable t;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat(prefix, "layers.", i, ".");
    t.Append(DescribeNorm("input_layernorm", p + "input_layernorm.weight", c.hidden_size));
    t.Append(mixer(i, p));
    t.Append(DescribeNorm("post_attention_layernorm", p + "post_attention_layernorm.weight", c.hidden_size));
    if (!c.IsMoeLayer(i)) {
      t.Append(DescribeSwiGlu(p + "mlp", c.hidden_size, c.intermediate_size));
    } else {
      t.Append(routed ? routed(p + "mlp")
                      : DescribeRoutedExperts(p + "mlp", c.hidden_size, c.num_experts, c.moe_intermediate_size,
                                              c.shared_expert.intermediate_size));
    }
  }
  return t;
}

}  // namespace lathe::params

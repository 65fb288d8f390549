// The architecture descriptions, one file each, mirroring runtime/archs/:
// each maps a config onto the rows of params/blocks.h per layer.
#ifndef LATHE_PARAMS_ARCHS_REGISTRY_H_
#define LATHE_PARAMS_ARCHS_REGISTRY_H_

#include <functional>
#include <string>

#include "core/model_config.h"
#include "params/param_table.h"

namespace lathe::params {

ParamTable DescribeLlamaFamilyLayers(const runtime::ModelConfig& config, const std::string& prefix);
ParamTable DescribeQwen35Layers(const runtime::ModelConfig& config, const std::string& prefix);
ParamTable DescribeDeepseekV3Layers(const runtime::ModelConfig& config, const std::string& prefix);
ParamTable DescribeGlmMoeDsaLayers(const runtime::ModelConfig& config, const std::string& prefix);

// The layer loop the descriptions share (runtime/archs' LoadPreNormLayers):
// input_layernorm, the mixer `mixer` gives for layer i under its prefix
// ("model.layers.3."), post_attention_layernorm, and the FFN under "mlp":
// `routed` for MoE layers (DescribeRoutedExperts when empty), the dense
// SwiGLU otherwise.
using DescribeMixerFn = std::function<ParamTable(int64_t layer, const std::string& layer_prefix)>;
using DescribeFfnFn = std::function<ParamTable(const std::string& mlp_prefix)>;
ParamTable DescribePreNormLayers(const runtime::ModelConfig& config, const std::string& prefix,
                                 const DescribeMixerFn& mixer, const DescribeFfnFn& routed = nullptr);

}  // namespace lathe::params

#endif  // LATHE_PARAMS_ARCHS_REGISTRY_H_

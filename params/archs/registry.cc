// The table of architecture descriptions: one line each, the names of
// runtime/archs/registry.cc.
#include "absl/strings/str_cat.h"
#include "params/archs/registry.h"
#include "params/model_table.h"

namespace lathe::params {
namespace {

struct Description {
  const char* name;  // config.json "architectures"[0]
  DescribeLayersFn describe_layers;
};

constexpr Description kDescriptions[] = {
    {"Qwen3ForCausalLM", DescribeLlamaFamilyLayers},
    {"Qwen3MoeForCausalLM", DescribeLlamaFamilyLayers},
    {"Qwen2ForCausalLM", DescribeLlamaFamilyLayers},
    {"LlamaForCausalLM", DescribeLlamaFamilyLayers},
    {"MistralForCausalLM", DescribeLlamaFamilyLayers},
    {"Qwen3_5ForCausalLM", DescribeQwen35Layers},
    {"Qwen3_5ForConditionalGeneration", DescribeQwen35Layers},
    {"Qwen3_5MoeForCausalLM", DescribeQwen35Layers},
    {"Qwen3_5MoeForConditionalGeneration", DescribeQwen35Layers},
    {"DeepseekV3ForCausalLM", DescribeDeepseekV3Layers},
    {"KimiK25ForConditionalGeneration", DescribeDeepseekV3Layers},
    {"Kimi_K25ForConditionalGeneration", DescribeDeepseekV3Layers},
    {"GlmMoeDsaForCausalLM", DescribeGlmMoeDsaLayers},
};

}  // namespace

absl::StatusOr<DescribeLayersFn> FindDescription(const runtime::ModelConfig& config) {
  std::string names;
  for (const Description& d : kDescriptions) {
    if (config.architecture == d.name) return d.describe_layers;
    absl::StrAppend(&names, names.empty() ? "" : ", ", d.name);
  }
  return absl::InvalidArgumentError(absl::StrCat("architecture ", config.architecture,
                                                 " has no parameter description (described: ", names, ")"));
}

}  // namespace lathe::params

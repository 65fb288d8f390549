// The table of architectures: one line each.
#include "runtime/archs/registry.h"

#include "absl/strings/str_cat.h"

namespace lathe::runtime {
namespace {

constexpr Architecture kArchitectures[] = {
    {"Qwen3ForCausalLM", LoadLlamaFamilyLayers},
    {"Qwen3MoeForCausalLM", LoadLlamaFamilyLayers},
    {"Qwen2ForCausalLM", LoadLlamaFamilyLayers},
    {"LlamaForCausalLM", LoadLlamaFamilyLayers},
    {"MistralForCausalLM", LoadLlamaFamilyLayers},
    {"Qwen3_5ForCausalLM", LoadQwen35Layers},
    {"Qwen3_5ForConditionalGeneration", LoadQwen35Layers},
    {"Qwen3_5MoeForCausalLM", LoadQwen35Layers},
    {"Qwen3_5MoeForConditionalGeneration", LoadQwen35Layers},
    {"DeepseekV3ForCausalLM", LoadDeepseekV3Layers},
    {"KimiK25ForConditionalGeneration", LoadDeepseekV3Layers},
    {"Kimi_K25ForConditionalGeneration", LoadDeepseekV3Layers},
    {"GlmMoeDsaForCausalLM", LoadGlmMoeDsaLayers},
};

}  // namespace

absl::StatusOr<const Architecture*> FindArchitecture(const ModelConfig& config) {
  std::string names;
  for (const Architecture& a : kArchitectures) {
    if (config.architecture == a.name) return &a;
    absl::StrAppend(&names, names.empty() ? "" : ", ", a.name);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("architecture ", config.architecture, " has no model implementation (supported: ", names, ")"));
}

}  // namespace lathe::runtime

// The DeepSeek-V3 part of config.json reading (multi-head latent attention,
// sigmoid group-limited routing, shared experts, dense first layers), as
// transformers 5.23's DeepseekV3Config reads it. Internal to
// ParseModelConfig.
#ifndef LATHE_CORE_DEEPSEEK_V3_CONFIG_H_
#define LATHE_CORE_DEEPSEEK_V3_CONFIG_H_

#include <string>

#include "absl/status/status.h"
#include "core/config_json.h"
#include "core/model_config.h"

namespace lathe::runtime {

// DeepseekV3ForCausalLM and the Kimi-K2.5 / K2.6 wrapper.
bool IsDeepseekV3(const std::string& architecture);
// KimiK25ForConditionalGeneration (the hub's name) or
// Kimi_K25ForConditionalGeneration (transformers'): a DeepSeek-V3 text model
// under `text_config` (model_type kimi_k2) beside a vision tower; weights
// under language_model.model. and language_model.lm_head.
bool IsKimiK25(const std::string& architecture);

// Reads the DeepSeek-V3 fields of `j` into `c`, whose dense fields ReadDense
// has filled (head_dim is replaced by the q·k head width): the latent
// attention, the router, the MoE layers and the checkpoint layout (the
// multi-token-prediction layer after the last one is skipped).
// InvalidArgument naming the field for a value transformers would compute
// differently from what lathe implements, or could not build.
absl::Status ReadDeepseekV3(const config_json::json& j, ModelConfig& c);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_DEEPSEEK_V3_CONFIG_H_

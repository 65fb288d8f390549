// The Qwen3.5 / Qwen3.6 part of config.json reading (hybrid Gated DeltaNet
// and gated attention layers, shared expert, multimodal wrapper). Internal
// to ParseModelConfig.
#ifndef LATHE_CORE_QWEN3_5_CONFIG_H_
#define LATHE_CORE_QWEN3_5_CONFIG_H_

#include <string>

#include "absl/status/status.h"
#include "core/config_json.h"
#include "core/model_config.h"

namespace lathe::runtime {

// Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM and their
// *ForConditionalGeneration wrappers (Qwen3.6 uses the same classes).
bool IsQwen3_5(const std::string& architecture);
// The wrappers: text fields under `text_config`, a vision tower beside them.
bool IsQwen3_5Wrapper(const std::string& architecture);
bool IsQwen3_5Moe(const std::string& architecture);

// Reads the Qwen3.5 fields of the text config `text` into `c`, whose dense
// fields ReadDense has filled: layer_types, the linear-attention heads, the
// rotary extent, the output gate, the norm style, the MoE block and the
// checkpoint layout. InvalidArgument naming the field for a value the
// model could not be built with.
absl::Status ReadQwen3_5(const config_json::json& text, ModelConfig& c);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_QWEN3_5_CONFIG_H_

// The GLM-5 part of config.json reading (GlmMoeDsaForCausalLM): DeepSeek-V3's
// latent attention and routing with GLM's defaults, plus DeepSeek sparse
// attention's indexer and its per-layer sharing, as transformers 5.23's
// GlmMoeDsaConfig reads them. Internal to ParseModelConfig.
#ifndef LATHE_CORE_GLM_MOE_DSA_CONFIG_H_
#define LATHE_CORE_GLM_MOE_DSA_CONFIG_H_

#include <string>

#include "absl/status/status.h"
#include "core/config_json.h"
#include "core/model_config.h"

namespace lathe::runtime {

bool IsGlmMoeDsa(const std::string& architecture);

// Reads the GLM-5 fields of `j` into `c`, whose dense fields ReadDense has
// filled: those DeepSeek-V3 shares (ReadDeepseekV3, with GLM's defaults for
// absent fields and RoPE always interleaved, as GLM's attention applies it),
// mlp_layer_types, and the indexer (index_topk, index_head_dim,
// index_n_heads, and indexer_types or the index_topk_pattern /
// index_topk_freq / index_skip_topk_offset schedule it is derived from).
// InvalidArgument naming the field for a value transformers would compute
// differently from lathe, or could not build.
absl::Status ReadGlmMoeDsa(const config_json::json& j, ModelConfig& c);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_GLM_MOE_DSA_CONFIG_H_

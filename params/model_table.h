// A whole text model's parameter table from its config: the embedding, the
// decoder layers as the architecture's description composes them, the
// final norm and the head. What `lathe plan` counts and what the runtime
// loads.
#ifndef LATHE_PARAMS_MODEL_TABLE_H_
#define LATHE_PARAMS_MODEL_TABLE_H_

#include <string>

#include "absl/status/statusor.h"
#include "core/model_config.h"
#include "params/param_table.h"

namespace lathe::params {

// The decoder layers of `config` whose weights are named `prefix` +
// "layers.{i}." (one function per architecture file, params/archs/).
using DescribeLayersFn = ParamTable (*)(const runtime::ModelConfig& config, const std::string& prefix);

// The description of `config`'s architecture; InvalidArgument naming it and
// the described ones when there is none.
absl::StatusOr<DescribeLayersFn> FindDescription(const runtime::ModelConfig& config);

// Every tensor of the text model and every adapter lathe may attach.
// Errors of FindDescription.
absl::StatusOr<ParamTable> DescribeModel(const runtime::ModelConfig& config);

// The embedding ("embed_tokens", vocabulary rows balanced over tp).
ParamTable DescribeEmbedding(const runtime::ModelConfig& config);
// The final norm and the head: lm_head (its adapter "lm_head" on the
// embedding when tied).
ParamTable DescribeHead(const runtime::ModelConfig& config);

}  // namespace lathe::params

#endif  // LATHE_PARAMS_MODEL_TABLE_H_

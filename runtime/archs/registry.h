// The architectures lathe runs, by their Hugging Face class names. Each has
// one file in runtime/archs/ that maps its config onto blocks (runtime/
// block.h) and its weight names onto the loader's rows; the model around the
// blocks (embedding, final norm, head) is shared.
#ifndef LATHE_RUNTIME_ARCHS_REGISTRY_H_
#define LATHE_RUNTIME_ARCHS_REGISTRY_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/block.h"
#include "core/model_config.h"

namespace lathe::runtime {

// Loads the decoder layers of `config` whose weights are named
// `prefix` + "layers.{i}." for this rank of `shard`.
using LoadLayersFn = absl::StatusOr<std::vector<std::unique_ptr<Block>>> (*)(const ModelConfig& config,
                                                                              ParamLoader& loader,
                                                                              const std::string& prefix,
                                                                              const ModelShard& shard);

struct Architecture {
  const char* name;        // config.json "architectures"[0]
  LoadLayersFn load_layers;
};

// The architecture of `config`; InvalidArgument naming it and the supported
// ones when lathe has no file for it.
absl::StatusOr<const Architecture*> FindArchitecture(const ModelConfig& config);

// The architecture files' entry points.
absl::StatusOr<std::vector<std::unique_ptr<Block>>> LoadLlamaFamilyLayers(const ModelConfig& config,
                                                                          ParamLoader& loader,
                                                                          const std::string& prefix,
                                                                          const ModelShard& shard);
absl::StatusOr<std::vector<std::unique_ptr<Block>>> LoadQwen35Layers(const ModelConfig& config,
                                                                     ParamLoader& loader,
                                                                     const std::string& prefix,
                                                                     const ModelShard& shard);
absl::StatusOr<std::vector<std::unique_ptr<Block>>> LoadDeepseekV3Layers(const ModelConfig& config,
                                                                         ParamLoader& loader,
                                                                         const std::string& prefix,
                                                                         const ModelShard& shard);
absl::StatusOr<std::vector<std::unique_ptr<Block>>> LoadGlmMoeDsaLayers(const ModelConfig& config,
                                                                        ParamLoader& loader,
                                                                        const std::string& prefix,
                                                                        const ModelShard& shard);

// Shared by the architecture files: layers of the pre-norm Block, each
// with the mixer `mixer` loads for layer i from its prefix
// ("model.layers.3."), and the FFN the config gives that layer (routed
// experts, with the config's shared expert, or the dense SwiGLU MLP). Norms
// follow config.norm_style. `routed` (when given) loads the MoE layers'
// FFN instead of RoutedExperts.
using LoadMixerFn =
    std::function<absl::StatusOr<std::unique_ptr<Mixer>>(int64_t layer, const std::string& layer_prefix)>;
using LoadFfnFn = std::function<absl::StatusOr<std::unique_ptr<Ffn>>(const std::string& mlp_prefix)>;
absl::StatusOr<std::vector<std::unique_ptr<Block>>> LoadPreNormLayers(const ModelConfig& config,
                                                                      ParamLoader& loader,
                                                                      const std::string& prefix,
                                                                      const ModelShard& shard,
                                                                      const LoadMixerFn& mixer,
                                                                      const LoadFfnFn& routed = nullptr);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_ARCHS_REGISTRY_H_

// A decoder-only transformer as transformers computes Qwen3, Qwen3-MoE and
// Llama/Mistral-style models, with a LoRA adapter or full fine-tuning. It owns
// the weights and the list of trainable parameters; losses, optimizer and
// validation live in the trainer.
#ifndef LATHE_RUNTIME_DECODER_MODEL_H_
#define LATHE_RUNTIME_DECODER_MODEL_H_

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/layers.h"
#include "runtime/lora_settings.h"
#include "runtime/model_config.h"

namespace lathe::runtime {

// One trainable leaf tensor. A stacked expert tensor (per_expert) holds all
// experts of a layer along dim 0 and its name carries "{e}" where the expert
// index goes, so it expands into one Hugging Face / PEFT name per expert.
struct TrainableParam {
  std::string name;
  at::Tensor tensor;
  bool per_expert = false;
};

// Calls fn(name, slice) for each named tensor `value` (shaped like p.tensor) holds.
void ForEachNamed(const TrainableParam& p, const at::Tensor& value,
                  const std::function<void(const std::string&, const at::Tensor&)>& fn);

struct DecoderLayer {
  at::Tensor input_norm, post_norm, q_norm, k_norm;
  LoraLinear q, k, v, o;
  bool moe = false;
  LoraLinear gate, up, down;  // dense MLP
  // With frozen base weights: [q; k; v] and [gate; up] stacked, the parts'
  // weights being views into them. Undefined in full fine-tuning.
  at::Tensor qkv_weight, gate_up_weight;
  at::Tensor router;          // [E, H]
  ExpertBank experts;
};

class DecoderModel {
 public:
  // Reads config.json and the safetensors weights of `dir` (fp32 compute).
  // NotFound / DataLoss for missing or corrupt files, InvalidArgument for an
  // unsupported config or a tensor of the wrong shape; all name the culprit.
  static absl::StatusOr<std::unique_ptr<DecoderModel>> Load(const std::string& dir,
                                                            const LoraSettings& lora);

  const ModelConfig& config() const { return config_; }
  const LoraSettings& lora() const { return lora_; }

  // tokens: int64 [T], the concatenation of independent sequences of the
  // given `lengths` (summing to T): each restarts its positions at 0 and
  // attends only to itself. Returns the final-norm hidden states [T, H];
  // records autograd history for the trainable parameters unless grad mode
  // is off.
  at::Tensor Hidden(const at::Tensor& tokens, const std::vector<int64_t>& lengths,
                    std::vector<MoeStats>* moe_stats) const;
  // Logits [T, V] (fp32) for hidden rows [T, H].
  at::Tensor Logits(const at::Tensor& hidden) const;

  std::vector<TrainableParam>& trainable() { return trainable_; }
  const std::vector<TrainableParam>& trainable() const { return trainable_; }

  // Overwrites trainable values by expanded name. InvalidArgument for an
  // unknown name or a shape mismatch; nothing is changed then.
  absl::Status SetTrainable(const std::map<std::string, at::Tensor>& values);

 private:
  DecoderModel() = default;
  absl::Status Build(const class WeightSource& source);
  void AttachLora(LoraLinear& layer, const std::string& prefix, bool enabled, at::Generator& gen);
  void AttachExpertLora(ExpertBank& bank, const std::string& prefix, at::Generator& gen);
  void RegisterFull();
  void FuseFrozenWeights();

  ModelConfig config_;
  LoraSettings lora_;
  at::Tensor embed_;       // [V, H]
  at::Tensor final_norm_;  // [H]
  LoraLinear lm_head_;     // weight aliases embed_ when tied
  std::vector<DecoderLayer> layers_;
  std::vector<TrainableParam> trainable_;
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_DECODER_MODEL_H_

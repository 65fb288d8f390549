// A decoder-only causal language model: embedding, the decoder layers an
// architecture file builds from blocks (runtime/archs/, runtime/block.h),
// the final norm and the output head, with a LoRA adapter or full
// fine-tuning. It owns the weights and the list of trainable parameters;
// losses, optimizer and validation live in the trainer.
//
// Cross-rank rule: with active groups in shard(), Hidden, Logits, Logprobs
// and HiddenLogprobs are collectives over them (and their backward passes
// too): every member calls them in the same order with the same lengths.
// They throw c10::Error when a collective fails.
#ifndef LATHE_RUNTIME_DECODER_MODEL_H_
#define LATHE_RUNTIME_DECODER_MODEL_H_

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/block.h"
#include "core/dtype.h"
#include "tensor/layers.h"
#include "core/lora_settings.h"
#include "core/model_config.h"
#include "runtime/model_shard.h"
#include "tensor/trainable_param.h"

namespace lathe::runtime {

class DecoderModel {
 public:
  // Reads config.json and the safetensors weights of `dir`, computing in
  // `dtype` (base weights held in it; see core/dtype.h).
  // NotFound / DataLoss for missing or corrupt files, InvalidArgument for an
  // unsupported config or a tensor of the wrong shape; all name the culprit.
  // With `shard`, reads only this rank's slices.
  static absl::StatusOr<std::unique_ptr<DecoderModel>> Load(const std::string& dir,
                                                            const LoraSettings& lora,
                                                            const ModelShard& shard = {},
                                                            Dtype dtype = Dtype::kFloat32);
  // The model of `config` with tensors from `source` (Load's errors).
  static absl::StatusOr<std::unique_ptr<DecoderModel>> FromSource(const ModelConfig& config,
                                                                  const class TensorSource& source,
                                                                  const LoraSettings& lora,
                                                                  const ModelShard& shard = {},
                                                                  Dtype dtype = Dtype::kFloat32);

  const ModelConfig& config() const { return config_; }
  Dtype dtype() const { return dtype_; }
  const LoraSettings& lora() const { return lora_; }

  // tokens: int64 [T], the concatenation of independent sequences of the
  // given `lengths` (summing to T): each restarts its positions at 0 and
  // attends only to itself. Returns the final-norm hidden states [T, H];
  // records autograd history for the trainable parameters unless grad mode
  // is off.
  //
  // With `caches` (one per sequence): each sequence continues its state — its
  // positions start at the state's length, each layer continues from what
  // its mixer kept (attention: the cached keys and values; Gated DeltaNet:
  // the conv window and recurrent state) and updates it, and the length
  // grows by the new tokens (no autograd: generation).
  //
  // With `recompute` (training without caches): each layer keeps only its
  // input for the backward and runs again inside it (see Recomputed); the
  // values and gradients are those of the plain pass. Every member of a
  // model-parallel group passes the same `recompute`.
  //
  // With `split` (context parallelism over shard().cp, without caches):
  // `lengths` are the whole sequences and `tokens` only this rank's rows of
  // them (split->own()); each runs at its position in its sequence and
  // attends to the whole sequence's keys and values up to itself, gathered
  // over the cp group layer by layer. Returns the hidden states of this
  // rank's rows. Every member of the cp group calls it with its own split of
  // the same lengths.
  at::Tensor Hidden(const at::Tensor& tokens, const std::vector<int64_t>& lengths,
                    std::vector<MoeStats>* moe_stats, std::vector<SequenceState>* caches = nullptr,
                    bool recompute = false, const parallel::SequenceSplit* split = nullptr) const;
  // Logits [T, V] (fp32) for hidden rows [T, H]; under tensor parallelism
  // this rank's vocabulary columns [vocab_begin(), vocab_begin() + Vl).
  at::Tensor Logits(const at::Tensor& hidden) const;
  int64_t vocab_begin() const { return vocab_begin_; }
  // Per-token logprobs of `targets` ([N] or [N, K], -100 ignored) under
  // Logits() rows, never gathering the vocabulary.
  at::Tensor Logprobs(const at::Tensor& logits, const at::Tensor& targets) const;
  // Logprobs(Logits(hidden), targets) computed `chunk` rows at a time, so no
  // [T, V] tensor exists at once when T > chunk: each chunk's logits are
  // freed after its logprobs, and the backward computes them again chunk by
  // chunk (see Recomputed). T <= chunk: exactly Logprobs(Logits(hidden), ...).
  // REQUIRES: chunk > 0.
  at::Tensor HiddenLogprobs(const at::Tensor& hidden, const at::Tensor& targets, int64_t chunk) const;
  // Per-token losses of the rows [begin, begin + n) from their logprobs
  // (which it may differentiate), shaped like them.
  using RowsLossFn = std::function<at::Tensor(const at::Tensor& logprobs, int64_t begin, int64_t n)>;
  struct HeadLoss {
    at::Tensor logprobs;     // [T] (detached)
    at::Tensor elementwise;  // [T], loss(logprobs) (detached)
    at::Tensor loss;         // the sum of `elementwise`, differentiable in hidden and the head
  };
  // HiddenLogprobs over 1-D targets, `chunk` rows at a time, followed by a
  // per-token loss, with each chunk's backward through the head run within
  // this call (ChunkedBackwardNow): as memory-frugal as HiddenLogprobs
  // without computing the logits a second time in the backward.
  // REQUIRES: chunk > 0; targets [T]; loss treats every row on its own.
  HeadLoss HiddenLoss(const at::Tensor& hidden, const at::Tensor& targets, int64_t chunk,
                      const RowsLossFn& loss) const;
  const ModelShard& shard() const { return shard_; }
  // Where every tensor of the model lives; inputs go there (OnDevice).
  at::Device device() const { return shard_.device; }

  std::vector<TrainableParam>& trainable() { return trainable_; }
  const std::vector<TrainableParam>& trainable() const { return trainable_; }

  // Overwrites trainable values by expanded name (and their bf16 copies).
  // InvalidArgument for an unknown name or a shape mismatch; nothing is
  // changed then.
  absl::Status SetTrainable(const std::map<std::string, at::Tensor>& values);

 private:
  DecoderModel() = default;
  absl::Status Build(const TensorSource& source);
  // Moves every tensor to shard_.device, keeping the fused weights' views,
  // the tied lm_head and the trainable list pointing at the moved tensors.
  void MoveToDevice();

  ModelConfig config_;
  Dtype dtype_ = Dtype::kFloat32;
  LoraSettings lora_;
  ModelShard shard_;
  int64_t vocab_begin_ = 0;
  at::Tensor embed_;       // [V, H]
  Norm final_norm_;
  LoraLinear lm_head_;     // weight aliases embed_ when tied
  std::vector<std::unique_ptr<Block>> blocks_;
  // Every tensor each block reads (what a recomputed block may train).
  std::vector<std::vector<at::Tensor>> block_params_;
  std::vector<TrainableParam> trainable_;
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_DECODER_MODEL_H_

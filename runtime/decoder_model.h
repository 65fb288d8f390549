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
#include "parallel/context_parallel.h"
#include "parallel/model_parallel.h"
#include "runtime/dtype.h"
#include "runtime/layers.h"
#include "runtime/lora_settings.h"
#include "runtime/model_config.h"

namespace lathe::runtime {

// How the gradient of a trainable tensor is completed across ranks before
// the optimizer step, and which ranks count it in the global norm.
enum class GradSync {
  kReplicated,  // same value on every tp rank, full gradient on each
  kTpSharded,   // a disjoint part on each tp rank (shard_dim), full gradient
  kTpPartial,   // replicated, each tp rank holds part of the gradient (sum over tp)
  kKvShared,    // a KV head held by several tp ranks, each with part of its gradient
  kExpert,      // experts of this ep rank; sum over the expert-data group
};

// One trainable leaf tensor. A stacked expert tensor (per_expert) holds the
// experts of a layer along dim 0 and its name carries "{e}" where the expert
// index goes, so it expands into one Hugging Face / PEFT name per expert.
// Under model parallelism a rank holds [shard_begin, shard_begin +
// tensor.size(shard_dim)) of dimension shard_dim of a tensor of full_size
// along it (shard_dim -1: the whole tensor).
//
// `tensor` is always fp32: what the optimizer updates, checkpoints hold and
// exports write. Under bfloat16 a fully fine-tuned weight is read by the
// forward from `compute`, its bf16 copy (the autograd leaf): `tensor` is then
// its fp32 master copy, gradients are moved into tensor's fp32 gradient after
// each backward (FoldComputeGradients) and `compute` is rounded from it after
// each change (RefreshComputeCopies). Undefined `compute`: the forward reads
// `tensor` (fp32 runs, LoRA A/B).
struct TrainableParam {
  std::string name;
  at::Tensor tensor;
  bool per_expert = false;
  GradSync sync = GradSync::kReplicated;
  int shard_dim = -1;
  int64_t shard_begin = 0;
  int64_t full_size = 0;
  at::Tensor compute = at::Tensor();
};

// Adds each bf16 `compute` gradient to its master's fp32 gradient (defining
// it if needed) and clears it. Nothing to do in fp32 runs.
void FoldComputeGradients(std::vector<TrainableParam>& params);
// Rounds every master into its `compute` copy (after an optimizer step, a
// load). Nothing to do in fp32 runs.
void RefreshComputeCopies(std::vector<TrainableParam>& params);

// The groups this rank's part of the model is sharded over; inactive groups
// (the default) load and run the whole model.
struct ModelShard {
  parallel::Group tp;  // tensor parallel: heads, MLP width, vocabulary
  parallel::Group ep;  // expert parallel: experts
  parallel::Group cp;  // context parallel: the tokens of each sequence (Hidden's `split`)
  // Where this rank's part lives and runs (runtime/device.h's TorchDevice).
  // The model is built on the CPU (LoRA drawn there, so every device starts
  // from the same adapter) and then moved.
  at::Device device{at::kCPU};
};

// Calls fn(name, slice) for each named tensor `value` (shaped like p.tensor)
// holds; experts are named by their global index.
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

// The keys and values of one sequence's past tokens, per layer (this rank's
// KV heads, after RoPE): k[l], v[l] are [kv_heads, length, head_dim]. Empty
// before the sequence's first tokens.
struct KvCache {
  std::vector<at::Tensor> k, v;
  int64_t length() const { return k.empty() ? 0 : k[0].size(1); }
};

class DecoderModel {
 public:
  // Reads config.json and the safetensors weights of `dir`, computing in
  // `dtype` (base weights held in it; see runtime/dtype.h).
  // NotFound / DataLoss for missing or corrupt files, InvalidArgument for an
  // unsupported config or a tensor of the wrong shape; all name the culprit.
  // With `shard`, reads only this rank's slices.
  static absl::StatusOr<std::unique_ptr<DecoderModel>> Load(const std::string& dir,
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
  // With `caches` (one per sequence): each sequence continues its cache — its
  // positions start at the cache's length, it attends to the cached tokens
  // too, and its new keys and values are appended (no autograd: generation).
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
                    std::vector<MoeStats>* moe_stats, std::vector<KvCache>* caches = nullptr,
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
  absl::Status Build(const class WeightSource& source);
  struct Cut;
  void AttachLora(LoraLinear& layer, const std::string& prefix, bool enabled, at::Generator& gen,
                  const Cut& cut);
  void AttachExpertLora(ExpertBank& bank, const std::string& prefix, at::Generator& gen);
  void RegisterFull();
  parallel::Group MoeStatsGroup() const;
  struct LayerPass;
  // Decoder layer `layer` on its input rows x [T, H]; stats (may be null)
  // receives the routing statistics of an MoE layer.
  at::Tensor Layer(size_t layer, const at::Tensor& x, const LayerPass& pass, MoeStats* stats) const;
  at::Tensor Moe(const DecoderLayer& l, const at::Tensor& m, MoeStats* stats) const;
  // Every tensor of the layer (undefined ones included) that may be trained.
  static std::vector<at::Tensor> LayerParams(const DecoderLayer& l);
  void FuseFrozenWeights();
  // Moves every tensor to shard_.device, keeping the fused weights' views,
  // the tied lm_head and the trainable list pointing at the moved tensors.
  void MoveToDevice();

  ModelConfig config_;
  Dtype dtype_ = Dtype::kFloat32;
  LoraSettings lora_;
  ModelShard shard_;
  int64_t vocab_begin_ = 0;
  // This rank's part of each sharded dimension.
  int64_t heads_ = 0, kv_heads_ = 0, kv_begin_ = 0, inter_begin_ = 0, expert_begin_ = 0;
  bool kv_shared_ = false;  // fewer KV heads than tp: each rank holds one
  at::Tensor embed_;       // [V, H]
  at::Tensor final_norm_;  // [H]
  LoraLinear lm_head_;     // weight aliases embed_ when tied
  std::vector<DecoderLayer> layers_;
  std::vector<TrainableParam> trainable_;
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_DECODER_MODEL_H_

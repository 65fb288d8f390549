// Loading a model's tensors from its checkpoint, each described once: its
// Hugging Face name, full shape, this rank's cut and how that cut's gradient
// completes, and the LoRA target group it belongs to. From that one
// description the loader reads the rank's slice, attaches the adapter (LoRA
// runs) or registers the tensor for training (full fine-tuning), so the
// checkpoint names, gradient sync and PEFT names all derive from it.
#ifndef LATHE_RUNTIME_PARAM_LOADER_H_
#define LATHE_RUNTIME_PARAM_LOADER_H_

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/lora_settings.h"
#include "params/param_table.h"
#include "runtime/model_shard.h"
#include "tensor/layers.h"
#include "tensor/trainable_param.h"

namespace lathe::runtime {

class TensorSource;

// The part of a tensor this rank holds under tensor parallelism, and how its
// gradient completes (see GradSync).
struct TpCut {
  int dim = -1;       // -1: the whole tensor on every rank
  int64_t begin = 0;  // first index along dim
  int64_t size = 0;   // indices held along dim
  GradSync sync = GradSync::kReplicated;

  // Output rows [begin, begin + size) of a column-parallel linear; `shared`:
  // rows several ranks hold (a KV head on fewer heads than ranks).
  static TpCut Rows(int64_t begin, int64_t size, bool shared = false) {
    return {0, begin, size, shared ? GradSync::kKvShared : GradSync::kTpSharded};
  }
  // Input columns [begin, begin + size) of a row-parallel linear.
  static TpCut Cols(int64_t begin, int64_t size) { return {1, begin, size, GradSync::kTpSharded}; }
  // The whole tensor on every rank, its gradient completed by `sync`
  // (kTpPartial when each rank's use covers part of the tokens or heads).
  static TpCut Whole(GradSync sync = GradSync::kReplicated) { return {-1, 0, 0, sync}; }
};

// Which LoRA target group a linear layer belongs to (LoraSettings picks the
// groups that train); kNone: never an adapter (routers, convolutions).
enum class LoraGroup { kNone, kAttn, kMlp, kUnembed };

// Calls fn on a tensor slot so it may be replaced (moved to a device) or
// read (collected for recompute).
using TensorVisitor = std::function<void(at::Tensor&)>;

// Linear layers that read the same input, stored as one [Σ out, in] weight
// whose row blocks the parts' weights are views of (frozen weights only).
struct FusedLinears {
  at::Tensor weight;
  std::vector<LoraLinear*> parts;

  // Stacks the parts' weights (REQUIRES: not trained in full).
  void Fuse();
  // Visits `weight` and then points the parts' weights at its row blocks
  // again; does nothing when not fused.
  void Visit(const TensorVisitor& fn);
  bool defined() const { return weight.defined(); }
};

// Visits a linear layer's weight, adapter and bias.
void VisitLinear(LoraLinear& l, const TensorVisitor& fn);

class ParamLoader {
 public:
  // Registers trainable tensors into `trainable` (full fine-tuning: every
  // tensor loaded through Tensor/Linear/Experts; LoRA: the adapters).
  ParamLoader(const TensorSource& source, const LoraSettings& lora, std::vector<TrainableParam>* trainable);

  bool full_finetune() const { return lora_.full_finetune(); }

  // The tensor `name` of full shape `shape`, cut by `cut`. In full
  // fine-tuning it is trainable, registered under `name`.
  absl::StatusOr<at::Tensor> Tensor(const std::string& name, std::vector<int64_t> shape, TpCut cut = {});

  // The tensor `name` in fp32 (exact from the file under either dtype),
  // never trained: a buffer transformers keeps in fp32, such as a router's
  // score correction bias.
  absl::StatusOr<at::Tensor> Frozen(const std::string& name, std::vector<int64_t> shape, TpCut cut = {});

  // The linear layer `module` ("model.layers.0.self_attn.q_proj"; its weight
  // is module + ".weight") of full shape [out, in], cut by `cut` (Rows or
  // Cols). LoRA runs attach an adapter when `group` trains.
  absl::StatusOr<LoraLinear> Linear(const std::string& module, int64_t out, int64_t in, TpCut cut,
                                    LoraGroup group);
  // The base weight only; its adapter is attached later by AttachLora (so an
  // adapter drawn last, the lm_head's, keeps its place in the draw order).
  absl::StatusOr<LoraLinear> FrozenLinear(const std::string& module, int64_t out, int64_t in, TpCut cut);
  // A part of the fused linear `fused` (weight [fused_out, in]) as its own
  // layer: rows [offset, offset + out) of it, of which this rank holds
  // `cut` (relative to the part); its adapter is named `module`, as if the
  // part were a linear layer of its own. LoRA runs only (full fine-tuning
  // trains the fused tensor through Tensor()).
  absl::StatusOr<LoraLinear> LinearPart(const std::string& fused, int64_t fused_out, int64_t in, int64_t offset,
                                        const std::string& module, int64_t out, TpCut cut, LoraGroup group);
  void AttachLora(LoraLinear& layer, const std::string& module, int64_t out, int64_t in, TpCut cut,
                  LoraGroup group);

  // Experts [begin, begin + count) of `total` of the MoE block at `mlp`
  // ("model.layers.3.mlp"), each [inter, hidden] / [hidden, inter]; trained
  // (full) or adapted (LoRA, group kMlp) per expert under
  // mlp + ".experts.{e}.<proj>".
  absl::StatusOr<ExpertBank> Experts(const std::string& mlp, int64_t total, int64_t begin, int64_t count,
                                     int64_t inter, int64_t hidden);

 private:
  bool Trains(LoraGroup group) const;
  // Registers a loaded tensor for full fine-tuning (bf16: through an fp32 master).
  void Register(const std::string& name, at::Tensor& t, TpCut cut, bool per_expert = false, int64_t full = 0);

  const TensorSource& source_;
  LoraSettings lora_;
  std::vector<TrainableParam>* trainable_;
  at::Generator gen_;
};

// A block's tensors loaded by role from its description (params/blocks.h):
// the Hugging Face name, full shape, cut kind and LoRA group come from the
// rows; this rank's [begin, size) from its place in `shard`. Roles the
// description lacks are Internal errors (the block and its description
// disagree).
class DescribedLoader {
 public:
  DescribedLoader(ParamLoader& loader, params::ParamTable rows, const ModelShard& shard);

  // This rank's place (tp, ep, full fine-tuning) and the cut of `row` there;
  // `whole`: how the gradient of a tensor every rank holds whole completes.
  params::RankPlace place() const { return place_; }
  TpCut CutOf(const params::TensorRow& row, GradSync whole = GradSync::kReplicated) const;
  absl::StatusOr<const params::TensorRow*> Row(const std::string& role) const;

  absl::StatusOr<at::Tensor> Tensor(const std::string& role, GradSync whole = GradSync::kReplicated);
  // Block `part` of a kPartRows tensor, this rank's rows of it.
  absl::StatusOr<at::Tensor> TensorPart(const std::string& role, int part);
  absl::StatusOr<at::Tensor> Frozen(const std::string& role);
  // The weight of the kFrozen row `role` in the run's dtype, never trained.
  absl::StatusOr<at::Tensor> FrozenWeight(const std::string& role);
  absl::StatusOr<LoraLinear> Linear(const std::string& role, GradSync whole = GradSync::kReplicated);
  // Block `part` of the kPartRows linear `role` as its own layer, with the
  // part's adapter (LoRA runs only).
  absl::StatusOr<LoraLinear> LinearPart(const std::string& role, int part);
  // The expert bank (roles experts.gate_proj / up_proj / down_proj) of this
  // ep rank.
  absl::StatusOr<ExpertBank> Experts();

 private:
  // The adapter group of the linear whose weight is `row`; kNone without one.
  LoraGroup GroupOf(const std::string& module) const;

  ParamLoader& loader_;
  params::ParamTable rows_;
  params::RankPlace place_;
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_PARAM_LOADER_H_

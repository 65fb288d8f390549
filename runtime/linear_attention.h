// Gated DeltaNet as a layer's mixer (Qwen3.5 / Qwen3.6 `linear_attention`
// layers): the input projections in_proj_qkv (q | k | v channels), in_proj_z,
// in_proj_b, in_proj_a, the GDN core of tensor/gated_delta_net.h, and
// out_proj. Heads are cut over tp: each rank holds Hk/tp key heads, Hv/tp
// value heads, their conv channels, A_log and dt_bias entries, and out_proj's
// matching input columns.
//
// in_proj_qkv holds three blocks whose rank parts are not one range, so it
// is used as three parts. LoRA runs train separate adapters on them,
// named in_proj_q, in_proj_k and in_proj_v (the fused-projection convention
// of Tinker; PEFT export joins them). Full fine-tuning trains in_proj_qkv and
// conv1d as whole tensors on every rank, each rank reading its channels, so
// their gradients are partial over tp (GradSync::kTpPartial).
//
// Under context parallelism (ctx.cp) the projected inputs of every member's
// rows are all-gathered, each member runs the recurrence over the whole
// sequences and keeps its own rows of the result (exact; the projections and
// out_proj stay split, the core's work and activations do not).
#ifndef LATHE_RUNTIME_LINEAR_ATTENTION_H_
#define LATHE_RUNTIME_LINEAR_ATTENTION_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/block.h"
#include "tensor/gated_delta_net.h"
#include "core/model_config.h"

namespace lathe::runtime {

class GatedDeltaNetMixer final : public Mixer {
 public:
  // Loads `prefix` ("model.layers.0.linear_attn") for this rank of `shard`.
  // InvalidArgument when the heads cannot be cut over tp.
  static absl::StatusOr<std::unique_ptr<GatedDeltaNetMixer>> Load(ParamLoader& loader, const std::string& prefix,
                                                                  int64_t hidden, const LinearAttentionConfig& config,
                                                                  double eps, const ModelShard& shard);

  // Decoding state per sequence: {conv window, recurrent state} (GdnState).
  at::Tensor Forward(const at::Tensor& x, const LayerContext& ctx, size_t layer) const override;
  void Visit(const TensorVisitor& fn) override;

 private:
  GatedDeltaNetMixer() = default;
  // This rank's conv input rows of in_proj_qkv / channels of conv1d: the
  // q, k and v ranges.
  at::Tensor LocalChannels(const at::Tensor& whole) const;

  GdnDims dims_;  // this rank's heads
  int64_t q_begin_ = 0, k_begin_ = 0, v_begin_ = 0;  // rows of the whole q | k | v
  // LoRA runs: the three parts of in_proj_qkv (this rank's rows), fused with
  // z, b and a into one GEMM; the conv weight of this rank's channels.
  LoraLinear q_, k_, v_, z_, b_, a_, out_;
  FusedLinears in_;
  // Full fine-tuning: the whole in_proj_qkv and conv1d weights.
  at::Tensor qkv_whole_, conv_whole_;
  GdnWeights weights_;  // conv_weight: this rank's channels (LoRA runs)
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_LINEAR_ATTENTION_H_

// Moving a built DecoderModel onto its rank's device.
#include <ATen/ATen.h>

#include <unordered_map>

#include "runtime/decoder_model.h"
#include "runtime/device.h"

namespace lathe::runtime {

void DecoderModel::MoveToDevice() {
  const at::Device device = shard_.device;
  if (device.is_cpu()) return;
  // One copy per storage-owning tensor, so aliases (the tied lm_head, the
  // trainable list) stay aliases.
  std::unordered_map<const void*, at::Tensor> moved;
  auto move = [&](at::Tensor& t) {
    if (!t.defined()) return;
    auto [it, fresh] = moved.try_emplace(t.unsafeGetTensorImpl());
    if (fresh) it->second = OnDevice(t, device);
    t = it->second;
  };
  move(embed_);
  move(final_norm_.weight);
  VisitLinear(lm_head_, move);
  // Fused weights first; their parts are views into them again afterwards.
  for (auto& block : blocks_) block->Visit(move);
  for (TrainableParam& p : trainable_) {
    move(p.tensor);
    move(p.compute);  // a bf16 weight's forward copy: the layer's tensor, already moved
  }
}

}  // namespace lathe::runtime

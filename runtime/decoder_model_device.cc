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
  // Fused weights first; their parts are views into them again afterwards.
  auto refuse = [&](at::Tensor& fused, std::vector<LoraLinear*> parts) {
    if (!fused.defined()) return;
    move(fused);
    int64_t offset = 0;
    for (LoraLinear* p : parts) {
      const int64_t rows = p->weight.size(0);
      p->weight = fused.narrow(0, offset, rows);
      offset += rows;
    }
  };
  auto linear = [&](LoraLinear& l) {
    move(l.weight);
    move(l.lora_a);
    move(l.lora_b);
  };
  move(embed_);
  move(final_norm_);
  linear(lm_head_);
  for (DecoderLayer& l : layers_) {
    for (at::Tensor* t : {&l.input_norm, &l.post_norm, &l.q_norm, &l.k_norm, &l.router}) move(*t);
    refuse(l.qkv_weight, {&l.q, &l.k, &l.v});
    if (!l.moe) refuse(l.gate_up_weight, {&l.gate, &l.up});
    for (LoraLinear* p : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down}) linear(*p);
    ExpertBank& e = l.experts;
    for (at::Tensor* t : {&e.gate, &e.up, &e.down, &e.gate_a, &e.gate_b, &e.up_a, &e.up_b, &e.down_a, &e.down_b}) {
      move(*t);
    }
  }
  for (TrainableParam& p : trainable_) {
    move(p.tensor);
    move(p.compute);  // a bf16 weight's forward copy: the layer's tensor, already moved
  }
}

}  // namespace lathe::runtime

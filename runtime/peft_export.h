// A LoRA run's adapter in PEFT's format: adapter_config.json +
// adapter_model.safetensors, keys "base_model.model.<module>.lora_A.weight" /
// "...lora_B.weight", experts one by one ("...mlp.experts.<e>.gate_proj..."),
// as the Hub's adapters are; PeftModel.from_pretrained loads it onto the
// transformers model (converting expert adapters for fused experts itself).
#ifndef LATHE_RUNTIME_PEFT_EXPORT_H_
#define LATHE_RUNTIME_PEFT_EXPORT_H_

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

#include "absl/status/status.h"
#include "runtime/lora_settings.h"

namespace lathe::runtime {

// Writes the adapter of `params` (whole LoRA tensors by lathe name; stacked
// expert tensors named with "{e}") to `dir`, atomically: under
// "<dir>.partial", renamed when complete. With `merge_base_dir` (the base
// model's Hugging Face folder) it also writes <dir>/merged/: the base model
// with W + (alpha / r)·B·A folded into every adapted weight, in the base's
// files, names and dtypes, plus its other files (config, tokenizer).
// <dir>/lathe_sampler.json records when it was made and, with ttl_seconds >
// 0, when the coordinator deletes it. AlreadyExists when `dir` exists; FailedPrecondition for full fine-tuning
// (no adapter) or an adapted weight the base files do not hold by name (e.g.
// experts stored fused); I/O errors as they happen.
absl::Status WritePeftAdapter(const std::map<std::string, at::Tensor>& params, const LoraSettings& lora,
                              const std::string& base_model, const std::string& dir,
                              const std::string& merge_base_dir = "", int64_t ttl_seconds = 0);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_PEFT_EXPORT_H_

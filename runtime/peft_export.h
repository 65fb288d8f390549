// A LoRA run's adapter in PEFT's format: adapter_config.json +
// adapter_model.safetensors, keys "base_model.model.<module>.lora_A.weight" /
// "...lora_B.weight", experts one by one ("...mlp.experts.<e>.gate_proj..."),
// as the Hub's adapters are; PeftModel.from_pretrained (peft 0.21) loads it
// onto the transformers 5 model, fusing the expert adapters itself. On a
// model with experts adapter_config.json names the MLP targets as
// target_parameters, which peft applies as they are (see peft_export.cc).
#ifndef LATHE_RUNTIME_PEFT_EXPORT_H_
#define LATHE_RUNTIME_PEFT_EXPORT_H_

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

#include "absl/status/status.h"
#include "core/lora_settings.h"

namespace lathe::runtime {

struct PeftExportOptions {
  std::string base_model;      // recorded as base_model_name_or_path
  std::string merge_base_dir;  // set: also write <dir>/merged/ from this base folder
  int64_t ttl_seconds = 0;     // > 0: when the coordinator deletes the export
  // Set: a folder moved in as <dir>/lathe before <dir> appears (lathe's own
  // shards of the weights), so the export is published whole or not at all.
  std::string shards_dir;
  bool merged_bf16 = false;  // the merged model in bf16 (a bfloat16 deployment's base)
};

// Writes the adapter of `params` (whole LoRA tensors by lathe name; stacked
// expert tensors named with "{e}") to `dir`, atomically: under
// "<dir>.partial", renamed when complete, removed on any failure (the
// shards_dir then stays where it was). With merge_base_dir it also writes
// <dir>/merged/, the base model with the adapter folded in (see
// WriteMergedModel). <dir>/lathe_sampler.json records when it was made and,
// with ttl_seconds > 0, when the coordinator deletes it (saturating at the
// largest int64 milliseconds). AlreadyExists when `dir` exists;
// FailedPrecondition for full fine-tuning (no adapter) or an adapted weight
// the base files cannot take (WriteMergedModel's refusals); I/O errors as they
// happen. Never throws.
absl::Status WritePeftAdapter(const std::map<std::string, at::Tensor>& params, const LoraSettings& lora,
                              const std::string& dir, const PeftExportOptions& options);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_PEFT_EXPORT_H_

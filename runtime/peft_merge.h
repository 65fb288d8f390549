// The merged export: a Hugging Face model folder with a LoRA adapter folded
// into its weights, loadable by transformers alone.
#ifndef LATHE_RUNTIME_PEFT_MERGE_H_
#define LATHE_RUNTIME_PEFT_MERGE_H_

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

#include "absl/status/status.h"

namespace lathe::runtime {

// Writes into `out` (created if missing) the model of `base_dir` with
// W + scale·B·A folded into every weight `params` adapts (whole LoRA tensors by
// lathe name, stacked experts named with "{e}"): the base's safetensors files
// with their own names, dtypes and metadata, and its other files copied.
// A tied model whose lm_head is adapted gets its own "lm_head.weight"
// (embedding + scale·B·A, in the file holding the embedding, entered in
// model.safetensors.index.json when the base is sharded) and
// "tie_word_embeddings": false in config.json.
// A base that stores a layer's experts fused, as transformers holds them
// (mlp.experts.gate_up_proj [E, 2I, H], gate rows then up rows;
// mlp.experts.down_proj [E, H, I]), gets each expert's products in its slices
// and keeps that layout. The embedding is model.embed_tokens.weight or, in the
// multimodal layout, model.language_model.embed_tokens.weight.
// FailedPrecondition naming the tensor when the base holds no weight to merge
// into, holds it in another shape or in a dtype other than F32/BF16/F16 (a
// quantized weight, F8 or "X.weight_packed", is refused as such: merging would
// need re-quantizing); checked before anything is written. I/O and
// format errors as they happen, with `out` partly written (the caller owns
// its removal). libtorch may throw c10::Error.
//
// With `bf16` (a bfloat16 deployment, whose base model is its bf16 rounding)
// every F32 and F16 tensor is written as BF16 (a merged weight is summed in
// fp32 and rounded once) and config.json says "torch_dtype": "bfloat16".
absl::Status WriteMergedModel(const std::map<std::string, at::Tensor>& params, double scale,
                              const std::string& base_dir, const std::string& out, bool bf16 = false);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_PEFT_MERGE_H_

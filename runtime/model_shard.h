// The groups a rank's part of the model is sharded over.
#ifndef LATHE_RUNTIME_MODEL_SHARD_H_
#define LATHE_RUNTIME_MODEL_SHARD_H_

#include <ATen/core/Tensor.h>

#include "parallel/model_parallel.h"

namespace lathe::runtime {

// Inactive groups (the default) load and run the whole model.
struct ModelShard {
  parallel::Group tp;  // tensor parallel: heads, MLP width, vocabulary
  parallel::Group ep;  // expert parallel: experts
  parallel::Group cp;  // context parallel: the tokens of each sequence (Hidden's `split`)
  // Where this rank's part lives and runs (runtime/device.h's TorchDevice).
  // The model is built on the CPU (LoRA drawn there, so every device starts
  // from the same adapter) and then moved.
  at::Device device{at::kCPU};
};

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_MODEL_SHARD_H_

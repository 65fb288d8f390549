// The model facts behind the coordinator's MFU estimate (docs/operations.md,
// "MFU"): matmul weights a token passes through, and the softmax-attention
// layers that add a term growing with the sequence length. Torch-free.
#ifndef LATHE_DP_WORKER_MODEL_FLOPS_H_
#define LATHE_DP_WORKER_MODEL_FLOPS_H_

#include <cstdint>

#include "core/model_config.h"

namespace lathe::dp_worker {

// Weights of every matmul one token passes through: per layer the attention
// projections (q, with its output gate where the config has one, k, v, o;
// the Gated DeltaNet projections in linear-attention layers) and the MLP
// (dense: gate, up, down; MoE: the router, num_experts_per_tok routed
// experts and the shared expert with its gate), plus the unembedding. Norms,
// biases, convolutions and the embedding lookup are not matmuls and are left out.
int64_t ActiveParameters(const runtime::ModelConfig& config);

// Layers of softmax attention (every layer but the linear-attention ones).
int64_t AttentionLayers(const runtime::ModelConfig& config);

}  // namespace lathe::dp_worker

#endif  // LATHE_DP_WORKER_MODEL_FLOPS_H_

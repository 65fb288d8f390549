// Completing gradients across ranks before the optimizer step, and the
// global gradient norm of a sharded model.
#ifndef LATHE_PARALLEL_GRAD_SYNC_H_
#define LATHE_PARALLEL_GRAD_SYNC_H_

#include <cstdint>
#include <vector>

#include "parallel/context.h"
#include "tensor/trainable_param.h"

namespace lathe::parallel {

// Sums every gradient over the ranks that hold part of it, by its GradSync:
// partial sums over tp (or the KV-sharing ranks) first, then dense
// gradients over the data group and expert gradients over the expert-data
// group (Tinker semantics: a sum, never a mean). Gradients travel in flat
// buckets of at most `bucket_bytes`. Undefined gradients count as zero, also
// on a rank that has none at all (a replica that got no datums); only when no
// rank of the world has a gradient is nothing sent. Collective over the
// world. Throws c10::Error when a collective fails.
void SyncGradients(std::vector<runtime::TrainableParam>& params, const ParallelContext& ctx,
                   int64_t bucket_bytes = 32 << 20);

// The L2 norm over every trainable tensor of the whole model, each counted
// once however many ranks hold a copy: equal to the single-process value.
// REQUIRES: SyncGradients ran. Collective over the world.
double GlobalGradNorm(const std::vector<runtime::TrainableParam>& params, const ParallelContext& ctx);

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_GRAD_SYNC_H_

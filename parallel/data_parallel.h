// Data parallelism without tensors: splitting a batch over data shards by
// token count, and putting the shards' outputs back together in datum order.
#ifndef LATHE_PARALLEL_DATA_PARALLEL_H_
#define LATHE_PARALLEL_DATA_PARALLEL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lathe/v1/types.pb.h"
#include "parallel/communicator.h"

namespace lathe::parallel {

// The shard (0..parts-1) of each datum: longest first to the shard with the
// fewest tokens so far (ties to the lowest shard). Deterministic, so every
// rank computes the same split.
std::vector<int> SplitByTokens(const std::vector<int64_t>& lengths, int parts);

// Combines metrics named "name:reduction" from several shards: sum, max and
// min as named; mean as the plain mean over the shards that report it.
// InvalidArgument for a name without a known reduction.
absl::Status MergeMetrics(const std::vector<const google::protobuf::Map<std::string, double>*>& parts,
                          google::protobuf::Map<std::string, double>* out);

// Every member contributes `mine` and receives every member's bytes, in
// member order. Collective over `group`.
absl::StatusOr<std::vector<std::string>> AllGatherBytes(const std::string& mine, Communicator& group,
                                                        absl::Duration timeout);

// Every member's status, in member order. Collective over `group`.
absl::StatusOr<std::vector<absl::Status>> AllGatherStatus(const absl::Status& mine, Communicator& group,
                                                          absl::Duration timeout);

// The same status on every member of `group`: OK when every member's is,
// else the first failure in member order (its code and message, naming the
// member). Collective.
absl::Status AgreeStatus(const absl::Status& mine, Communicator& group, absl::Duration timeout);

// Every member of `data` (one rank per data shard) contributes the outputs of
// the datums it ran (`mine`: their indices into the batch, in the order of
// part.loss_fn_outputs); every member gets the whole batch's output with
// loss_fn_outputs in datum order and merged metrics.
absl::StatusOr<lathe::v1::ForwardBackwardOutput> GatherOutputs(const lathe::v1::ForwardBackwardOutput& part,
                                                              const std::vector<int>& mine, int num_datums,
                                                              Communicator& data, absl::Duration timeout);

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_DATA_PARALLEL_H_

// A ParallelContext for a model folder over the MPI world, from the degrees a
// user gives on the command line.
#ifndef LATHE_RUNTIME_PARALLEL_SETUP_H_
#define LATHE_RUNTIME_PARALLEL_SETUP_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "parallel/context.h"

namespace lathe::runtime {

// devices_per_node = world size / (replicas × node_count); the model's heads,
// KV heads, experts and MLP width are checked against tp and ep, tp × cp
// against the node group (the same InvalidArgument on every rank).
// Collective over MPI_COMM_WORLD.
// `device`: this rank's CUDA device (parallel::DeviceChoice::index), -1 for
// the CPU. Ranks on a GPU in a world of several ranks get an NCCL twin of
// every group (parallel::AttachNccl); FailedPrecondition when lathe was built
// without NCCL. Every rank of the world passes -1, or every rank a device.
absl::StatusOr<std::unique_ptr<parallel::ParallelContext>> MakeModelContext(const std::string& model_dir,
                                                                            int replicas, int node_count, int tp,
                                                                            int ep, absl::Duration timeout,
                                                                            int cp = 1, int device = -1);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_PARALLEL_SETUP_H_

// Mesh and model dimensions for MakeMpiContext.
#include "runtime/parallel_setup.h"

#include <mpi.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/model_config.h"
#include "core/status.h"
#ifdef LATHE_HAVE_NCCL
#include "parallel/nccl_communicator.h"
#endif

namespace lathe::runtime {

absl::StatusOr<std::unique_ptr<parallel::ParallelContext>> MakeModelContext(const std::string& model_dir,
                                                                            int replicas, int node_count, int tp,
                                                                            int ep, absl::Duration timeout,
                                                                            int cp, int device) {
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  auto config = LoadModelConfig(model_dir);
  if (!config.ok()) return config.status();
  parallel::MeshShape shape;
  shape.replicas = replicas;
  shape.node_count = node_count;
  shape.devices_per_node = replicas > 0 && node_count > 0 ? std::max(1, world / (replicas * node_count)) : 1;
  shape.tp = tp;
  shape.ep = ep;
  shape.cp = cp;
  parallel::ModelDims dims{config->num_attention_heads, config->num_key_value_heads, config->num_experts,
                           config->HasDenseMlp() ? config->intermediate_size : 0};
  if (config->IsHybrid()) {
    dims.linear_num_key_heads = config->linear_attention.num_key_heads;
    dims.linear_num_value_heads = config->linear_attention.num_value_heads;
  }
  dims.shared_expert_intermediate_size = config->shared_expert.intermediate_size;
  LATHE_ASSIGN_OR_RETURN(auto ctx, parallel::MakeMpiContext(shape, dims, timeout));
  if (device < 0 || world == 1) return ctx;
#ifdef LATHE_HAVE_NCCL
  LATHE_RETURN_IF_ERROR(parallel::AttachNccl(*ctx, device));
  return ctx;
#else
  return absl::FailedPreconditionError(absl::StrCat(
      "rank on CUDA device ", device, " in a world of ", world,
      " ranks, but lathe was built without the NCCL backend (LATHE_WITH_NCCL=ON, docs/build-and-dependencies.md)"));
#endif
}

}  // namespace lathe::runtime

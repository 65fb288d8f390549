// The rank layout of a deployment: which ranks form each tensor-parallel,
// data, expert-parallel, expert-data, replica and cross-replica group. Pure
// integer math, the one place that knows the order of the mesh axes.
//
// Order, fastest-varying first: tp, then cp (the ranks that split each
// sequence of a data group between them), then the data groups inside a
// replica, then replica. A replica is the contiguous block of G = node_count ×
// devices_per_node ranks, so the cross-replica group of a rank holds the same
// (node_rank, local_rank) device of every replica. Expert parallelism splits
// a replica into G / ep contiguous blocks of ep ranks.
#ifndef LATHE_PARALLEL_MESH_H_
#define LATHE_PARALLEL_MESH_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace lathe::parallel {

struct MeshShape {
  int replicas = 1;
  int node_count = 1;
  int devices_per_node = 1;
  int tp = 1;
  int ep = 1;
  int cp = 1;  // context parallel: ranks of a data group that split each sequence

  int group_size() const { return node_count * devices_per_node; }
  int world_size() const { return replicas * group_size(); }
};

// What the model asks of the mesh; zero fields are not checked.
struct ModelDims {
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t num_experts = 0;
  int64_t intermediate_size = 0;  // dense MLP width, split over tp
  // Linear-attention (Gated DeltaNet) layers, split over tp by head.
  int64_t linear_num_key_heads = 0;
  int64_t linear_num_value_heads = 0;
  int64_t shared_expert_intermediate_size = 0;  // a MoE layer's shared expert, split over tp
};

// Where one rank sits, and the ranks (ascending) of each group it belongs to.
struct RankPlace {
  int rank = 0;
  int replica = 0;
  int node_rank = 0;   // global node index: rank / devices_per_node
  int local_rank = 0;  // device on its node
  int tp_rank = 0;
  int cp_rank = 0;     // part of each sequence inside the data group
  int dp_rank = 0;     // data group inside the replica
  int ep_rank = 0;
  std::vector<int> tp_group;             // same replica, data group and cp_rank
  std::vector<int> cp_group;             // same replica, data group and tp_rank
  std::vector<int> dp_group;             // same replica, tp_rank and cp_rank: one rank per data group
  std::vector<int> ep_group;             // same replica, same block of ep ranks
  std::vector<int> expert_data_group;    // same ep_rank in every block of every replica
  std::vector<int> replica_group;        // every rank of the replica
  std::vector<int> cross_replica_group;  // same position in every replica
  std::vector<int> dense_grad_group;     // same tp_rank in every (data group, cp_rank) of every replica
};

// Checks every degree against the world and the model. InvalidArgument with
// one message naming each violated rule: world size ≠ replicas × node_count ×
// devices_per_node, tp not dividing devices_per_node, tp × cp not dividing
// the group, ep not dividing the group, heads % tp, KV heads neither divisible by nor dividing tp,
// experts % ep, dense MLP width % tp, linear-attention key and value heads
// % tp, shared-expert width % tp, non-positive degrees.
absl::Status ValidateMesh(const MeshShape& shape, int world_size, const ModelDims& model);

// The place of `rank`. REQUIRES: ValidateMesh(shape, shape.world_size(), ...) is OK
// and 0 <= rank < shape.world_size().
RankPlace PlaceOf(const MeshShape& shape, int rank);

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_MESH_H_

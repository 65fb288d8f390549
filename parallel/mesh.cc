// Rank generator; see mesh.h for the axis order.
#include "parallel/mesh.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lathe::parallel {

absl::Status ValidateMesh(const MeshShape& s, int world_size, const ModelDims& m) {
  std::vector<std::string> problems;
  for (auto [value, name] : {std::pair{s.replicas, "replicas"}, {s.node_count, "node_count"},
                             {s.devices_per_node, "devices_per_node"}, {s.tp, "tp"}, {s.ep, "ep"},
                             {s.cp, "cp"}}) {
    if (value <= 0) problems.push_back(absl::StrCat(name, " must be positive (is ", value, ")"));
  }
  if (!problems.empty()) return absl::InvalidArgumentError(absl::StrJoin(problems, "; "));
  if (world_size != s.world_size()) {
    problems.push_back(absl::StrCat("world size ", world_size, " != replicas ", s.replicas,
                                    " x node_count ", s.node_count, " x devices_per_node ",
                                    s.devices_per_node, " = ", s.world_size()));
  }
  if (s.devices_per_node % s.tp != 0) {
    problems.push_back(absl::StrCat("tp ", s.tp, " does not divide devices_per_node ", s.devices_per_node));
  }
  if (s.devices_per_node % s.tp == 0 && s.group_size() % (int64_t{s.tp} * s.cp) != 0) {
    problems.push_back(absl::StrCat("tp ", s.tp, " x cp ", s.cp, " does not divide the node group of ",
                                    s.group_size(), " ranks"));
  }
  if (s.group_size() % s.ep != 0) {
    problems.push_back(absl::StrCat("ep ", s.ep, " does not divide the node group of ", s.group_size(), " ranks"));
  }
  if (m.num_attention_heads > 0 && m.num_attention_heads % s.tp != 0) {
    problems.push_back(absl::StrCat("attention heads ", m.num_attention_heads, " are not divisible by tp ", s.tp));
  }
  if (m.num_key_value_heads > 0 && m.num_key_value_heads % s.tp != 0 && s.tp % m.num_key_value_heads != 0) {
    problems.push_back(absl::StrCat("KV heads ", m.num_key_value_heads, " neither divide nor are divisible by tp ", s.tp));
  }
  if (m.intermediate_size > 0 && m.intermediate_size % s.tp != 0) {
    problems.push_back(absl::StrCat("MLP width ", m.intermediate_size, " is not divisible by tp ", s.tp));
  }
  if (m.linear_num_key_heads > 0 && m.linear_num_key_heads % s.tp != 0) {
    problems.push_back(
        absl::StrCat("linear-attention key heads ", m.linear_num_key_heads, " are not divisible by tp ", s.tp));
  }
  if (m.linear_num_value_heads > 0 && m.linear_num_value_heads % s.tp != 0) {
    problems.push_back(
        absl::StrCat("linear-attention value heads ", m.linear_num_value_heads, " are not divisible by tp ", s.tp));
  }
  if (m.shared_expert_intermediate_size > 0 && m.shared_expert_intermediate_size % s.tp != 0) {
    problems.push_back(absl::StrCat("shared expert width ", m.shared_expert_intermediate_size,
                                    " is not divisible by tp ", s.tp));
  }
  if (s.ep > 1 && m.num_experts == 0) {
    problems.push_back(absl::StrCat("ep ", s.ep, " needs a mixture-of-experts model"));
  } else if (m.num_experts > 0 && m.num_experts % s.ep != 0) {
    problems.push_back(absl::StrCat("experts ", m.num_experts, " are not divisible by ep ", s.ep));
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("invalid layout: ", absl::StrJoin(problems, "; ")));
}

namespace {

std::vector<int> Strided(int start, int count, int stride) {
  std::vector<int> out;
  for (int i = 0; i < count; ++i) out.push_back(start + i * stride);
  return out;
}

}  // namespace

RankPlace PlaceOf(const MeshShape& s, int rank) {
  const int g = s.group_size();
  const int blocks = g / s.ep;  // expert-parallel blocks per replica
  RankPlace p;
  p.rank = rank;
  p.replica = rank / g;
  const int q = rank % g;  // position inside the replica
  const int base = p.replica * g;
  p.node_rank = rank / s.devices_per_node;
  p.local_rank = rank % s.devices_per_node;
  const int tc = s.tp * s.cp;  // ranks of one data group
  p.tp_rank = q % s.tp;
  p.cp_rank = (q / s.tp) % s.cp;
  p.dp_rank = q / tc;
  p.ep_rank = q % s.ep;
  const int block = q / s.ep;
  p.tp_group = Strided(base + p.dp_rank * tc + p.cp_rank * s.tp, s.tp, 1);
  p.cp_group = Strided(base + p.dp_rank * tc + p.tp_rank, s.cp, s.tp);
  p.dp_group = Strided(base + p.cp_rank * s.tp + p.tp_rank, g / tc, tc);
  p.ep_group = Strided(base + block * s.ep, s.ep, 1);
  for (int r = 0; r < s.replicas; ++r) {
    for (int b = 0; b < blocks; ++b) p.expert_data_group.push_back(r * g + b * s.ep + p.ep_rank);
    for (int d = 0; d < g / s.tp; ++d) p.dense_grad_group.push_back(r * g + d * s.tp + p.tp_rank);
  }
  p.replica_group = Strided(base, g, 1);
  p.cross_replica_group = Strided(q, s.replicas, g);
  return p;
}

}  // namespace lathe::parallel

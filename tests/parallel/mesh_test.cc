// The rank generator over many layouts: groups partition the world, replicas
// are contiguous, TP stays on a node, cross-replica groups pair the same
// device of every replica; invalid layouts are refused with every reason.
#include "parallel/mesh.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <set>

namespace lathe::parallel {
namespace {

using GroupOf = std::function<const std::vector<int>&(const RankPlace&)>;

// Every rank is in its own group, and every member agrees on the group:
// the groups partition the world.
void ExpectPartition(const MeshShape& s, const std::vector<RankPlace>& places, const GroupOf& group,
                     size_t size, const char* what) {
  for (const RankPlace& p : places) {
    const std::vector<int>& g = group(p);
    ASSERT_EQ(g.size(), size) << what << " of rank " << p.rank;
    EXPECT_TRUE(std::is_sorted(g.begin(), g.end())) << what;
    EXPECT_TRUE(std::count(g.begin(), g.end(), p.rank) == 1) << what << " lacks rank " << p.rank;
    for (int member : g) {
      ASSERT_GE(member, 0);
      ASSERT_LT(member, s.world_size());
      EXPECT_EQ(group(places[member]), g) << what << ": ranks " << p.rank << " and " << member << " disagree";
    }
  }
}

std::vector<MeshShape> Layouts() {
  std::vector<MeshShape> out;
  for (int replicas : {1, 2, 3, 4}) {
    for (int nodes : {1, 2, 3}) {
      for (int dpn : {1, 2, 4, 8}) {
        for (int tp = 1; tp <= dpn; tp *= 2) {
          for (int ep = 1; ep <= nodes * dpn; ++ep) {
            for (int cp = 1; cp <= nodes * dpn / tp; cp *= 2) {
              if ((nodes * dpn) % ep == 0 && (nodes * dpn) % (tp * cp) == 0) {
                out.push_back({replicas, nodes, dpn, tp, ep, cp});
              }
            }
          }
        }
      }
    }
  }
  return out;
}

TEST(MeshTest, GroupsPartitionTheWorldInEveryLayout) {
  int checked = 0;
  for (const MeshShape& s : Layouts()) {
    SCOPED_TRACE(testing::Message() << "replicas " << s.replicas << " nodes " << s.node_count << " dpn "
                                    << s.devices_per_node << " tp " << s.tp << " ep " << s.ep << " cp " << s.cp);
    ASSERT_TRUE(ValidateMesh(s, s.world_size(), {}).ok() || s.ep > 1);
    std::vector<RankPlace> places;
    for (int r = 0; r < s.world_size(); ++r) places.push_back(PlaceOf(s, r));
    const int g = s.group_size();
    ExpectPartition(s, places, [](const RankPlace& p) -> const std::vector<int>& { return p.tp_group; }, s.tp, "tp");
    ExpectPartition(s, places, [](const RankPlace& p) -> const std::vector<int>& { return p.cp_group; }, s.cp, "cp");
    ExpectPartition(s, places, [](const RankPlace& p) -> const std::vector<int>& { return p.dp_group; },
                    g / (s.tp * s.cp), "dp");
    ExpectPartition(s, places, [](const RankPlace& p) -> const std::vector<int>& { return p.ep_group; }, s.ep, "ep");
    ExpectPartition(s, places, [](const RankPlace& p) -> const std::vector<int>& { return p.expert_data_group; },
                    static_cast<size_t>(s.replicas * g / s.ep), "expert data");
    ExpectPartition(s, places, [](const RankPlace& p) -> const std::vector<int>& { return p.replica_group; }, g, "replica");
    ExpectPartition(s, places, [](const RankPlace& p) -> const std::vector<int>& { return p.cross_replica_group; },
                    s.replicas, "cross replica");
    ExpectPartition(s, places, [](const RankPlace& p) -> const std::vector<int>& { return p.dense_grad_group; },
                    static_cast<size_t>(s.replicas * g / s.tp), "dense grad");
    for (const RankPlace& p : places) {
      // A replica is a contiguous block of ranks.
      EXPECT_EQ(p.replica_group.front(), p.replica * g);
      EXPECT_EQ(p.replica_group.back(), (p.replica + 1) * g - 1);
      // Cross-replica peers are the same device of every replica.
      for (int peer : p.cross_replica_group) {
        const RankPlace& q = places[peer];
        EXPECT_EQ(q.local_rank, p.local_rank);
        EXPECT_EQ(q.node_rank - q.replica * s.node_count, p.node_rank - p.replica * s.node_count);
        EXPECT_EQ(q.tp_rank, p.tp_rank);
        EXPECT_EQ(q.ep_rank, p.ep_rank);
      }
      // Tensor parallelism stays on one node; its members differ only in tp_rank.
      std::set<int> tp_ranks;
      for (int m : p.tp_group) {
        EXPECT_EQ(places[m].node_rank, p.node_rank);
        EXPECT_EQ(places[m].dp_rank, p.dp_rank);
        tp_ranks.insert(places[m].tp_rank);
      }
      EXPECT_EQ(static_cast<int>(tp_ranks.size()), s.tp);
      // A cp group is one tp position of one data group, each member a part of its sequences.
      std::set<int> cp_ranks;
      for (int m : p.cp_group) {
        EXPECT_EQ(places[m].dp_rank, p.dp_rank);
        EXPECT_EQ(places[m].tp_rank, p.tp_rank);
        cp_ranks.insert(places[m].cp_rank);
      }
      EXPECT_EQ(static_cast<int>(cp_ranks.size()), s.cp);
      for (int m : p.dp_group) EXPECT_EQ(places[m].cp_rank, p.cp_rank);
      // Members of an expert-data group hold the same experts (same ep_rank).
      for (int m : p.expert_data_group) EXPECT_EQ(places[m].ep_rank, p.ep_rank);
      for (int m : p.dense_grad_group) EXPECT_EQ(places[m].tp_rank, p.tp_rank);
    }
    ++checked;
  }
  EXPECT_GT(checked, 200);
}

TEST(MeshTest, KnownLayoutOfTwoReplicasWithTpTwo) {
  MeshShape s{2, 1, 4, 2, 4};  // 2 replicas × (1 node × 4 devices), tp 2, ep 4
  RankPlace p = PlaceOf(s, 5);
  EXPECT_EQ(p.replica, 1);
  EXPECT_EQ(p.tp_rank, 1);
  EXPECT_EQ(p.dp_rank, 0);
  EXPECT_EQ(p.tp_group, (std::vector<int>{4, 5}));
  EXPECT_EQ(p.dp_group, (std::vector<int>{5, 7}));
  EXPECT_EQ(p.ep_group, (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(p.expert_data_group, (std::vector<int>{1, 5}));
  EXPECT_EQ(p.cross_replica_group, (std::vector<int>{1, 5}));
  EXPECT_EQ(p.dense_grad_group, (std::vector<int>{1, 3, 5, 7}));
}

TEST(MeshTest, KnownLayoutWithContextParallelism) {
  MeshShape s{1, 1, 8, 2, 1, 2};  // 8 devices: tp 2 inside cp 2 inside 2 data groups
  RankPlace p = PlaceOf(s, 6);
  EXPECT_EQ(p.tp_rank, 0);
  EXPECT_EQ(p.cp_rank, 1);
  EXPECT_EQ(p.dp_rank, 1);
  EXPECT_EQ(p.tp_group, (std::vector<int>{6, 7}));
  EXPECT_EQ(p.cp_group, (std::vector<int>{4, 6}));
  EXPECT_EQ(p.dp_group, (std::vector<int>{2, 6}));
  EXPECT_EQ(p.dense_grad_group, (std::vector<int>{0, 2, 4, 6}));
  // cp alone: every rank of the group holds a part of the same sequences.
  EXPECT_EQ(PlaceOf({1, 1, 4, 1, 1, 4}, 2).cp_group, (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(PlaceOf({1, 1, 4, 1, 1, 4}, 2).dp_group, (std::vector<int>{2}));
}

TEST(MeshTest, InvalidLayoutsAreRefusedWithEveryReason) {
  ModelDims qwen3_moe{32, 4, 128};
  EXPECT_TRUE(ValidateMesh({2, 1, 4, 2, 4}, 8, qwen3_moe).ok());
  auto s = ValidateMesh({2, 1, 4, 2, 4}, 6, qwen3_moe);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("world size 6 != replicas 2 x node_count 1 x devices_per_node 4 = 8"),
            std::string::npos) << s;
  s = ValidateMesh({1, 1, 8, 8, 3}, 8, {12, 3, 10});
  EXPECT_NE(s.message().find("ep 3 does not divide the node group of 8 ranks"), std::string::npos) << s;
  EXPECT_NE(s.message().find("attention heads 12 are not divisible by tp 8"), std::string::npos) << s;
  EXPECT_NE(s.message().find("KV heads 3 neither divide nor are divisible by tp 8"), std::string::npos) << s;
  EXPECT_NE(s.message().find("experts 10 are not divisible by ep 3"), std::string::npos) << s;
  EXPECT_NE(ValidateMesh({1, 1, 4, 3, 1}, 4, {}).message().find("tp 3 does not divide devices_per_node 4"),
            std::string::npos);
  EXPECT_NE(ValidateMesh({1, 1, 2, 1, 2}, 2, {16, 8, 0}).message().find("needs a mixture-of-experts"),
            std::string::npos);
  EXPECT_NE(ValidateMesh({0, 1, 2, 1, 1}, 2, {}).message().find("replicas must be positive"), std::string::npos);
  EXPECT_NE(ValidateMesh({1, 1, 2, 1, 1, 0}, 2, {}).message().find("cp must be positive"), std::string::npos);
  EXPECT_NE(ValidateMesh({1, 1, 4, 2, 1, 3}, 4, {}).message().find("tp 2 x cp 3 does not divide the node group of 4"),
            std::string::npos);
  // A product past int's range is refused, not wrapped.
  EXPECT_FALSE(ValidateMesh({1, 1, 8, 8, 1, 1 << 29}, 8, {}).ok());
  // cp may span nodes.
  EXPECT_TRUE(ValidateMesh({1, 2, 2, 1, 1, 4}, 4, {}).ok());
  EXPECT_NE(ValidateMesh({1, 1, 4, 4, 1}, 4, {16, 8, 0, 1002}).message().find("MLP width 1002 is not divisible by tp 4"),
            std::string::npos);
  // KV heads fewer than tp are replicated: valid.
  EXPECT_TRUE(ValidateMesh({1, 1, 8, 8, 1}, 8, {32, 4, 0}).ok());
}

TEST(MeshTest, LinearAttentionHeadsAndTheSharedExpertMustSplitOverTp) {
  // Qwen3.5-27B: 24 / 4 attention heads, 16 / 48 linear-attention key / value heads.
  ModelDims qwen3_5{24, 4, 0, 17408, 16, 48};
  EXPECT_TRUE(ValidateMesh({1, 1, 8, 8, 1}, 8, qwen3_5).ok());
  ModelDims uneven = qwen3_5;
  uneven.linear_num_key_heads = 12;
  uneven.linear_num_value_heads = 36;
  auto s = ValidateMesh({1, 1, 8, 8, 1}, 8, uneven);
  EXPECT_NE(s.message().find("linear-attention key heads 12 are not divisible by tp 8"), std::string::npos) << s;
  EXPECT_NE(s.message().find("linear-attention value heads 36 are not divisible by tp 8"), std::string::npos) << s;
  EXPECT_TRUE(ValidateMesh({1, 1, 4, 4, 1}, 4, uneven).ok());
  ModelDims moe{16, 2, 256, 0, 16, 32, 500};
  s = ValidateMesh({1, 1, 8, 8, 8}, 8, moe);
  EXPECT_NE(s.message().find("shared expert width 500 is not divisible by tp 8"), std::string::npos) << s;
  EXPECT_TRUE(ValidateMesh({1, 1, 8, 4, 8}, 8, moe).ok());
}

}  // namespace
}  // namespace lathe::parallel

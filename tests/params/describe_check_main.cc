// lathe_describe_check: holds an architecture's parameter description
// (params/) and its runtime loader together on one checkpoint folder.
//
//   lathe_describe_check --model DIR
//
// Checks, printing one line per failure and then "PASS" or "N failures":
//  - the checkpoint's text-model tensors (skipped vision / MTP prefixes
//    aside) are the description's, name by name, and their numel sums to
//    the description's parameter count (what `lathe plan` counts);
//  - at tp 1/2 x ep 1/2, on every rank, under LoRA and full fine-tuning, the
//    tensors the runtime asks the checkpoint for are exactly the described
//    ones at their full shapes, each rank's slices are the description's
//    cut, and the parameters it trains (adapters, or weights) count what the
//    description's per-rank count says.
// Exit 0 when all hold, 1 otherwise.
#include <ATen/ATen.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/model_config.h"
#include "core/safetensors.h"
#include "params/model_table.h"
#include "parallel/communicator.h"
#include "runtime/decoder_model.h"
#include "runtime/weight_source.h"

namespace lathe::runtime {
namespace {

using parallel::Buffer;

int failures = 0;

void Fail(const std::string& what) {
  std::printf("FAIL %s\n", what.c_str());
  ++failures;
}

// A rank's place in a group, for loading only: loading sends nothing.
class PlaceOnly final : public parallel::Communicator {
 public:
  PlaceOnly(int rank, int size) : rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::Status AllReduceSum(Buffer, absl::Duration) override { return Refuse(); }
  absl::Status AllReduceMax(Buffer, absl::Duration) override { return Refuse(); }
  absl::Status AllGather(Buffer, Buffer, absl::Duration) override { return Refuse(); }
  absl::Status ReduceScatterSum(Buffer, Buffer, absl::Duration) override { return Refuse(); }
  absl::Status AllToAll(Buffer, const std::vector<int64_t>&, Buffer, const std::vector<int64_t>&,
                        absl::Duration) override {
    return Refuse();
  }
  absl::Status Broadcast(Buffer, int, absl::Duration) override { return Refuse(); }
  absl::Status Barrier(absl::Duration) override { return Refuse(); }

 private:
  static absl::Status Refuse() { return absl::InternalError("loading must not communicate"); }
  int rank_, size_;
};

// Passes every read to the checkpoint and records what was asked.
class Recorder final : public TensorSource {
 public:
  explicit Recorder(const TensorSource& inner) : inner_(inner) {}
  struct Ask {
    std::vector<int64_t> shape;
    std::vector<Slice> slices;
  };
  struct ExpertAsk {
    int64_t experts, inter, hidden, first, count;
  };
  absl::StatusOr<at::Tensor> Take(const std::string& name, std::vector<int64_t> shape, Slice slice) const override {
    Record(name, shape, slice);
    return inner_.Take(name, std::move(shape), slice);
  }
  absl::StatusOr<at::Tensor> TakeFloat32(const std::string& name, std::vector<int64_t> shape,
                                         Slice slice) const override {
    Record(name, shape, slice);
    return inner_.TakeFloat32(name, std::move(shape), slice);
  }
  absl::StatusOr<Experts> TakeExperts(const std::string& mlp, int64_t experts, int64_t inter, int64_t hidden,
                                      int64_t first, int64_t count) const override {
    experts_[mlp] = {experts, inter, hidden, first, count};
    return inner_.TakeExperts(mlp, experts, inter, hidden, first, count);
  }
  const std::map<std::string, Ask>& asks() const { return asks_; }
  const std::map<std::string, ExpertAsk>& expert_asks() const { return experts_; }

 private:
  void Record(const std::string& name, const std::vector<int64_t>& shape, Slice slice) const {
    Ask& a = asks_[name];
    if (!a.shape.empty() && a.shape != shape) Fail(absl::StrCat(name, ": asked at two shapes"));
    a.shape = shape;
    a.slices.push_back(slice);
  }
  const TensorSource& inner_;
  mutable std::map<std::string, Ask> asks_;
  mutable std::map<std::string, ExpertAsk> experts_;
};

std::string Shape(const std::vector<int64_t>& s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

// The MoE prefix of an expert row's name ("X.experts.{e}.gate_proj.weight" -> "X").
std::string ExpertMlp(const std::string& name) { return name.substr(0, name.find(".experts.{e}.")); }

bool Skipped(const ModelConfig& c, const std::string& name) {
  for (const std::string& p : c.checkpoint.skip_prefixes) {
    if (absl::StartsWith(name, p)) return true;
  }
  return false;
}

// The checkpoint against the description: names and parameter count.
void CheckCheckpoint(const std::string& dir, const ModelConfig& c, const params::ParamTable& table) {
  auto ckpt = SafetensorsCheckpoint::Open(dir);
  if (!ckpt.ok()) return Fail(std::string(ckpt.status().message()));
  std::set<std::string> described, expert_mlps;
  double described_numel = 0;
  for (const params::TensorRow& t : table.tensors) {
    described_numel += double(t.numel());
    if (t.cut == params::Cut::kExperts) {
      expert_mlps.insert(ExpertMlp(t.name));
    } else {
      described.insert(t.name);
    }
  }
  double numel = 0;
  std::set<std::string> seen;
  for (const std::string& name : (*ckpt)->names()) {
    if (Skipped(c, name)) continue;
    auto view = (*ckpt)->Get(name);
    if (!view.ok()) return Fail(std::string(view.status().message()));
    int64_t n = 1;
    for (int64_t d : view->shape) n *= d;
    numel += double(n);
    const size_t experts = name.find(".experts.");
    if (experts != std::string::npos && expert_mlps.count(name.substr(0, experts))) continue;
    if (!described.count(name)) Fail(absl::StrCat("checkpoint tensor ", name, " is not described"));
    seen.insert(name);
  }
  for (const std::string& name : described) {
    if (!seen.count(name)) Fail(absl::StrCat("described tensor ", name, " is not in the checkpoint"));
  }
  if (numel != described_numel) {
    Fail(absl::StrCat("checkpoint holds ", numel, " parameters, the description ", described_numel));
  }
}

// A recorded ask's slices as a RankPart.
params::RankPart PartOfAsk(const Recorder::Ask& a) {
  params::RankPart part;
  for (const Slice& s : a.slices) {
    if (s.dim < 0) return params::RankPart{};
    part.dim = s.dim;
    part.ranges.push_back({s.begin, s.size});
  }
  return part;
}

void CheckRank(const ModelConfig& c, const params::ParamTable& table, const TensorSource& source,
               const params::RankPlace& place, int64_t lora_rank) {
  const std::string where = absl::StrCat("tp ", place.tp_rank, "/", place.tp, " ep ", place.ep_rank, "/", place.ep,
                                         lora_rank > 0 ? " LoRA: " : " full: ");
  PlaceOnly tp(place.tp_rank, place.tp), ep(place.ep_rank, place.ep);
  ModelShard shard;
  if (place.tp > 1) shard.tp.comm = &tp;
  if (place.ep > 1) shard.ep.comm = &ep;
  LoraSettings lora;
  lora.rank = lora_rank;
  Recorder recorder(source);
  auto model = DecoderModel::FromSource(c, recorder, lora, shard);
  if (!model.ok()) return Fail(where + std::string(model.status().message()));
  std::set<std::string> described;
  for (const params::TensorRow& t : table.tensors) {
    if (t.cut == params::Cut::kExperts) {
      auto it = recorder.expert_asks().find(ExpertMlp(t.name));
      if (it == recorder.expert_asks().end()) {
        Fail(where + "experts of " + t.name + " not loaded");
        continue;
      }
      const auto [first, count] = params::CutRange(params::Cut::kExperts, t.shape[0], 1, place);
      const Recorder::ExpertAsk& e = it->second;
      const bool down = absl::StrContains(t.name, "down_proj");
      const std::vector<int64_t> asked =
          down ? std::vector<int64_t>{e.experts, e.hidden, e.inter} : std::vector<int64_t>{e.experts, e.inter, e.hidden};
      if (asked != t.shape || e.first != first || e.count != count) {
        Fail(absl::StrCat(where, t.name, " loaded as ", Shape(asked), " experts [", e.first, ", +", e.count,
                          "), described ", Shape(t.shape), " [", first, ", +", count, ")"));
      }
      continue;
    }
    described.insert(t.name);
    auto it = recorder.asks().find(t.name);
    if (it == recorder.asks().end()) {
      Fail(where + t.name + " described, not loaded");
      continue;
    }
    if (it->second.shape != t.shape) {
      Fail(absl::StrCat(where, t.name, " loaded at ", Shape(it->second.shape), ", described ", Shape(t.shape)));
    }
    const params::RankPart loaded = PartOfAsk(it->second), want = params::PartOf(t, place);
    if (loaded.dim != want.dim || loaded.ranges != want.ranges) {
      Fail(absl::StrCat(where, t.name, ": this rank's cut differs from the description (", loaded.size(), " vs ",
                        want.size(), " along dim ", want.dim, ")"));
    }
  }
  for (const auto& [name, ask] : recorder.asks()) {
    if (!described.count(name)) Fail(where + name + " loaded, not described");
  }
  // What trains on this rank is what the description counts.
  double trained = 0;
  for (const TrainableParam& p : (*model)->trainable()) trained += double(p.tensor.numel());
  const params::RankCount count = params::CountRank(table, place, lora_rank);
  const double want = lora_rank > 0 ? count.adapters : count.weights;
  if (trained != want) Fail(absl::StrCat(where, "trains ", trained, " parameters, the description counts ", want));
}

int Main(int argc, char** argv) {
  std::string dir;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--model") == 0) dir = argv[i + 1];
  }
  if (dir.empty()) {
    std::fprintf(stderr, "usage: lathe_describe_check --model DIR\n");
    return 2;
  }
  auto config = LoadModelConfig(dir);
  if (!config.ok()) return std::fprintf(stderr, "%s\n", std::string(config.status().message()).c_str()), 1;
  auto table = params::DescribeModel(*config);
  if (!table.ok()) return std::fprintf(stderr, "%s\n", std::string(table.status().message()).c_str()), 1;
  CheckCheckpoint(dir, *config, *table);
  auto source = WeightSource::Open(dir);
  if (!source.ok()) return std::fprintf(stderr, "%s\n", std::string(source.status().message()).c_str()), 1;
  for (auto [tp, ep] : {std::pair{1, 1}, {2, 1}, {1, 2}, {2, 2}}) {
    for (int tr = 0; tr < tp; ++tr) {
      for (int er = 0; er < ep; ++er) {
        for (int64_t r : {4, 0}) {
          params::RankPlace place{tp, tr, ep, er, r == 0};
          CheckRank(*config, *table, *source, place, r);
        }
      }
    }
  }
  if (failures == 0) {
    std::printf("PASS %zu tensors, %zu adapters\n", table->tensors.size(), table->adapters.size());
    return 0;
  }
  std::printf("%d failures\n", failures);
  return 1;
}

}  // namespace
}  // namespace lathe::runtime

int main(int argc, char** argv) { return lathe::runtime::Main(argc, argv); }

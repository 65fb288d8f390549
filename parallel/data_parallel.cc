// Batch splitting and output gathering for data parallelism.
#include "parallel/data_parallel.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <numeric>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace lathe::parallel {

std::vector<int> SplitByTokens(const std::vector<int64_t>& lengths, int parts) {
  std::vector<int> order(lengths.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return lengths[a] > lengths[b]; });
  std::vector<int64_t> load(parts, 0);
  std::vector<int> shard(lengths.size(), 0);
  for (int i : order) {
    int best = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    shard[i] = best;
    load[best] += lengths[i];
  }
  return shard;
}

absl::Status MergeMetrics(const std::vector<const google::protobuf::Map<std::string, double>*>& parts,
                          google::protobuf::Map<std::string, double>* out) {
  std::map<std::string, std::pair<double, int>> acc;
  for (const auto* part : parts) {
    for (const auto& [name, value] : *part) {
      auto [it, fresh] = acc.try_emplace(name, value, 1);
      if (fresh) continue;
      double& v = it->second.first;
      if (absl::EndsWith(name, ":sum") || absl::EndsWith(name, ":mean")) {
        v += value;
      } else if (absl::EndsWith(name, ":max")) {
        v = std::max(v, value);
      } else if (absl::EndsWith(name, ":min")) {
        v = std::min(v, value);
      } else {
        return absl::InvalidArgumentError(absl::StrCat("metric '", name, "' has no :sum/:mean/:max/:min reduction"));
      }
      it->second.second += 1;
    }
  }
  for (const auto& [name, vc] : acc) {
    (*out)[name] = absl::EndsWith(name, ":mean") ? vc.first / vc.second : vc.first;
  }
  return absl::OkStatus();
}

absl::StatusOr<lathe::v1::ForwardBackwardOutput> GatherOutputs(const lathe::v1::ForwardBackwardOutput& part,
                                                              const std::vector<int>& mine, int num_datums,
                                                              Communicator& data, absl::Duration timeout) {
  // Each member's record: [index count, indices..., serialized output], in int64 words.
  std::string bytes;
  part.SerializeToString(&bytes);
  std::vector<int64_t> record(2 + mine.size() + (bytes.size() + 7) / 8, 0);
  record[0] = static_cast<int64_t>(mine.size());
  std::copy(mine.begin(), mine.end(), record.begin() + 1);
  record[1 + mine.size()] = static_cast<int64_t>(bytes.size());
  std::memcpy(record.data() + 2 + mine.size(), bytes.data(), bytes.size());
  const int n = data.size();
  int64_t words = static_cast<int64_t>(record.size());
  std::vector<int64_t> sizes(n);
  absl::Status s = data.AllGather({&words, 1, ElemType::kInt64}, {sizes.data(), n, ElemType::kInt64}, timeout);
  if (!s.ok()) return s;
  const int64_t widest = *std::max_element(sizes.begin(), sizes.end());
  record.resize(widest, 0);
  std::vector<int64_t> all(widest * n);
  s = data.AllGather({record.data(), widest, ElemType::kInt64}, {all.data(), widest * n, ElemType::kInt64}, timeout);
  if (!s.ok()) return s;

  lathe::v1::ForwardBackwardOutput out;
  out.set_loss_fn_output_type(part.loss_fn_output_type());
  std::vector<lathe::v1::ForwardBackwardOutput> parts(n);
  std::vector<const lathe::v1::LossFnOutput*> slots(num_datums, nullptr);
  std::vector<const google::protobuf::Map<std::string, double>*> metrics;
  for (int m = 0; m < n; ++m) {
    const int64_t* r = all.data() + m * widest;
    const int64_t count = r[0], len = r[1 + count];
    if (!parts[m].ParseFromArray(r + 2 + count, static_cast<int>(len)) || parts[m].loss_fn_outputs_size() != count) {
      return absl::InternalError(absl::StrCat("data shard ", m, " sent an unreadable output"));
    }
    for (int64_t i = 0; i < count; ++i) slots.at(r[1 + i]) = &parts[m].loss_fn_outputs(static_cast<int>(i));
    metrics.push_back(&parts[m].metrics());
  }
  for (int i = 0; i < num_datums; ++i) {
    if (slots[i] == nullptr) return absl::InternalError(absl::StrCat("no data shard ran datum ", i));
    *out.add_loss_fn_outputs() = *slots[i];
  }
  if (absl::Status ms = MergeMetrics(metrics, out.mutable_metrics()); !ms.ok()) return ms;
  return out;
}

}  // namespace lathe::parallel

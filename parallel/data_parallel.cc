// Batch splitting and output gathering for data parallelism.
#include "parallel/data_parallel.h"

#include <algorithm>
#include <cstdlib>
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

absl::StatusOr<std::vector<std::string>> AllGatherBytes(const std::string& mine, Communicator& group,
                                                        absl::Duration timeout) {
  // Lengths first, then every record padded to the longest, in int64 words.
  const int n = group.size();
  int64_t len = static_cast<int64_t>(mine.size());
  std::vector<int64_t> lens(n);
  absl::Status s = group.AllGather({&len, 1, ElemType::kInt64}, {lens.data(), n, ElemType::kInt64}, timeout);
  if (!s.ok()) return s;
  const int64_t words = (*std::max_element(lens.begin(), lens.end()) + 7) / 8;
  std::vector<int64_t> record(words, 0), all(words * n);
  std::memcpy(record.data(), mine.data(), mine.size());
  s = group.AllGather({record.data(), words, ElemType::kInt64}, {all.data(), words * n, ElemType::kInt64}, timeout);
  if (!s.ok()) return s;
  std::vector<std::string> out(n);
  for (int m = 0; m < n; ++m) out[m].assign(reinterpret_cast<const char*>(all.data() + m * words), lens[m]);
  return out;
}

absl::StatusOr<std::vector<absl::Status>> AllGatherStatus(const absl::Status& mine, Communicator& group,
                                                          absl::Duration timeout) {
  const std::string record = mine.ok() ? "" : absl::StrCat(static_cast<int>(mine.code()), "\t", mine.message());
  absl::StatusOr<std::vector<std::string>> all = AllGatherBytes(record, group, timeout);
  if (!all.ok()) return all.status();
  std::vector<absl::Status> out;
  for (const std::string& r : *all) {
    const size_t tab = r.find('\t');
    out.push_back(r.empty() ? absl::OkStatus()
                            : absl::Status(static_cast<absl::StatusCode>(std::atoi(r.c_str())),
                                           tab == std::string::npos ? "" : r.substr(tab + 1)));
  }
  return out;
}

absl::Status AgreeStatus(const absl::Status& mine, Communicator& group, absl::Duration timeout) {
  absl::StatusOr<std::vector<absl::Status>> all = AllGatherStatus(mine, group, timeout);
  if (!all.ok()) return all.status();
  for (size_t m = 0; m < all->size(); ++m) {
    const absl::Status& s = (*all)[m];
    if (s.ok()) continue;
    return m == static_cast<size_t>(group.rank()) ? s
                                                  : absl::Status(s.code(), absl::StrCat(s.message(), " (member ", m, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<lathe::v1::ForwardBackwardOutput> GatherOutputs(const lathe::v1::ForwardBackwardOutput& part,
                                                              const std::vector<int>& mine, int num_datums,
                                                              Communicator& data, absl::Duration timeout) {
  // Each member's record: [index count, indices..., serialized output].
  std::string record(8 * (1 + mine.size()), '\0');
  const int64_t count = static_cast<int64_t>(mine.size());
  std::memcpy(record.data(), &count, 8);
  for (size_t i = 0; i < mine.size(); ++i) {
    const int64_t index = mine[i];
    std::memcpy(record.data() + 8 * (1 + i), &index, 8);
  }
  record += part.SerializeAsString();
  absl::StatusOr<std::vector<std::string>> all = AllGatherBytes(record, data, timeout);
  if (!all.ok()) return all.status();
  const int n = data.size();
  lathe::v1::ForwardBackwardOutput out;
  out.set_loss_fn_output_type(part.loss_fn_output_type());
  std::vector<lathe::v1::ForwardBackwardOutput> parts(n);
  std::vector<const lathe::v1::LossFnOutput*> slots(num_datums, nullptr);
  std::vector<const google::protobuf::Map<std::string, double>*> metrics;
  for (int m = 0; m < n; ++m) {
    const std::string& r = (*all)[m];
    int64_t got = 0;
    if (r.size() >= 8) std::memcpy(&got, r.data(), 8);
    const size_t head = 8 * (1 + static_cast<size_t>(std::max<int64_t>(got, 0)));
    if (r.size() < head || !parts[m].ParseFromArray(r.data() + head, static_cast<int>(r.size() - head)) ||
        parts[m].loss_fn_outputs_size() != got) {
      return absl::InternalError(absl::StrCat("data shard ", m, " sent an unreadable output"));
    }
    for (int64_t i = 0; i < got; ++i) {
      int64_t index = 0;
      std::memcpy(&index, r.data() + 8 * (1 + i), 8);
      slots.at(index) = &parts[m].loss_fn_outputs(static_cast<int>(i));
    }
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

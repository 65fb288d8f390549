// Checkpoint save (dedup of slices, shard files, manifest commit) and load
// (slice boxes intersected with this rank's, CRC-checked).
#include "runtime/checkpoint.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"
#include "parallel/data_parallel.h"
#include "runtime/adamw.h"
#include "core/crc32c.h"
#include "runtime/decoder_model.h"
#include "core/safetensors.h"
#include "core/saturating.h"
#include "core/guarded.h"
#include "core/status.h"
#include "runtime/trainer.h"

namespace lathe::runtime {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kFormat = "lathe-checkpoint-1";
const char* const kKinds[] = {"param", "exp_avg", "exp_avg_sq"};

absl::Status Agree(const absl::Status& mine, parallel::Communicator* group, absl::Duration timeout) {
  return group == nullptr ? mine : parallel::AgreeStatus(mine, *group, timeout);
}

absl::Status Errno(const std::string& what) { return absl::InternalError(absl::StrCat(what, ": ", strerror(errno))); }

absl::Status FsyncPath(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return Errno("open " + path);
  const int rc = ::fsync(fd);
  ::close(fd);
  return rc == 0 ? absl::OkStatus() : Errno("fsync " + path);
}

std::vector<int64_t> GlobalShape(const TrainableParam& p) {
  std::vector<int64_t> shape(p.tensor.sizes().begin(), p.tensor.sizes().end());
  if (p.shard_dim >= 0) shape[p.shard_dim] = p.full_size;
  return shape;
}

std::string SliceKey(const TrainableParam& p) {
  return absl::StrCat(p.name, "@", p.shard_dim < 0 ? 0 : p.shard_begin, "+",
                      p.shard_dim < 0 ? 0 : p.tensor.size(p.shard_dim));
}

// Which of this rank's parameters it writes: those no lower member holds.
absl::StatusOr<std::vector<bool>> Writers(const std::vector<TrainableParam>& params, parallel::Communicator* group,
                                          absl::Duration timeout) {
  std::vector<bool> mine(params.size(), true);
  if (group == nullptr) return mine;
  std::string keys;
  for (const TrainableParam& p : params) absl::StrAppend(&keys, SliceKey(p), "\n");
  LATHE_ASSIGN_OR_RETURN(std::vector<std::string> all, parallel::AllGatherBytes(keys, *group, timeout));
  std::set<std::string> lower;
  for (int m = 0; m < group->rank(); ++m) {
    for (absl::string_view k : absl::StrSplit(all[m], '\n', absl::SkipEmpty())) lower.insert(std::string(k));
  }
  for (size_t i = 0; i < params.size(); ++i) mine[i] = lower.count(SliceKey(params[i])) == 0;
  return mine;
}

// Writes this rank's shard file and returns its manifest entries.
absl::StatusOr<json> WriteShard(Trainer& trainer, const std::vector<bool>& writes, const std::string& partial,
                                const ShardPlace& place, bool with_optimizer) {
  std::vector<TrainableParam>& params = trainer.model().trainable();
  std::vector<AdamW::State>& states = trainer.optimizer().states();
  std::vector<at::Tensor> keep;
  std::vector<TensorToWrite> tensors;
  std::vector<std::pair<size_t, int>> what;  // (param, kind)
  for (size_t i = 0; i < params.size(); ++i) {
    if (!writes[i]) continue;
    for (int kind = 0; kind < 3; ++kind) {
      if (kind > 0 && (states.empty() || !with_optimizer)) break;
      at::Tensor t = kind == 0 ? params[i].tensor : kind == 1 ? states[i].exp_avg : states[i].exp_avg_sq;
      keep.push_back(t.detach().to(at::kCPU, at::kFloat).contiguous());  // written from host memory
      tensors.push_back({absl::StrCat(kKinds[kind], "/", params[i].name), "F32",
                         std::vector<int64_t>(t.sizes().begin(), t.sizes().end()), keep.back().data_ptr(),
                         static_cast<size_t>(keep.back().nbytes())});
      what.emplace_back(i, kind);
    }
  }
  json entries = json::array();
  if (tensors.empty()) return entries;
  const std::string rel = absl::StrCat("node_rank-", place.node_rank, "/rank-", place.local_rank, ".safetensors");
  std::error_code ec;
  fs::create_directories(fs::path(partial) / absl::StrCat("node_rank-", place.node_rank), ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", partial, ": ", ec.message()));
  LATHE_RETURN_IF_ERROR(WriteSafetensors(partial + "/" + rel, tensors));
  LATHE_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(partial + "/" + rel));
  for (size_t j = 0; j < tensors.size(); ++j) {
    const auto [i, kind] = what[j];
    LATHE_ASSIGN_OR_RETURN(TensorView view, file->Get(tensors[j].name));
    const TrainableParam& p = params[i];
    json e = {{"name", p.name}, {"kind", kKinds[kind]}, {"tensor", tensors[j].name}, {"dtype", "F32"},
              {"global_shape", GlobalShape(p)}, {"shard_dim", p.shard_dim},
              {"begin", p.shard_dim < 0 ? 0 : p.shard_begin}, {"file", rel}, {"node_rank", place.node_rank},
              {"offset", view.offset}, {"nbytes", view.nbytes},
              {"crc32c", Crc32c(view.data, view.nbytes)}};
    if (kind == 1) e["adam_step"] = states[i].step;
    entries.push_back(std::move(e));
  }
  return entries;
}

absl::Status Commit(const json& manifest, const std::string& partial, const std::string& dir, bool overwrite) {
  const std::string tmp = partial + "/manifest.json.tmp";
  {
    std::ofstream out(tmp);
    out << manifest.dump(1);
    if (!out) return Errno("write " + tmp);
  }
  LATHE_RETURN_IF_ERROR(FsyncPath(tmp));
  if (::rename(tmp.c_str(), (partial + "/manifest.json").c_str()) != 0) return Errno("rename " + tmp);
  LATHE_RETURN_IF_ERROR(FsyncPath(partial));
  std::error_code ec;
  const std::string old = dir + ".replaced";
  const bool replace = overwrite && fs::exists(dir, ec);
  if (replace) {
    fs::remove_all(old, ec);  // left by an overwrite that died before removing it
    fs::rename(dir, old, ec);
    if (ec) return absl::InternalError(absl::StrCat("cannot move ", dir, " aside: ", ec.message()));
  }
  if (::rename(partial.c_str(), dir.c_str()) != 0) {
    const absl::Status s = Errno("rename " + partial);
    if (replace) fs::rename(old, dir, ec);  // the previous checkpoint stays in place
    return s;
  }
  fs::remove_all(old, ec);
  return FsyncPath(fs::path(dir).parent_path().string());
}

json LoraJson(const LoraSettings& l) {
  return {{"rank", l.rank}, {"alpha", l.alpha}, {"seed", l.seed}, {"train_attn", l.train_attn},
          {"train_mlp", l.train_mlp}, {"train_unembed", l.train_unembed}};
}

// Writes the shards into `partial` and commits it as `dir`; every member returns the same status.
absl::Status WriteAndCommit(Trainer& trainer, const std::string& dir, const std::string& partial, bool overwrite,
                            const CheckpointMeta& meta, const ShardPlace& place, parallel::Communicator* group,
                            absl::Duration timeout) {
  const bool first = group == nullptr || group->rank() == 0;
  absl::Status s;
  absl::StatusOr<json> entries = Guarded("save_state", [&]() -> absl::StatusOr<json> {
    LATHE_ASSIGN_OR_RETURN(std::vector<bool> writes, Writers(trainer.model().trainable(), group, timeout));
    return WriteShard(trainer, writes, partial, place, meta.with_optimizer);
  });
  LATHE_RETURN_IF_ERROR(Agree(entries.status(), group, timeout));
  std::vector<std::string> all = {entries->dump()};
  if (group != nullptr) {
    LATHE_ASSIGN_OR_RETURN(all, parallel::AllGatherBytes(entries->dump(), *group, timeout));
  }
  // Fault-injection hook for tests: hold the shards on disk uncommitted for a
  // while, so a test can kill a rank in the middle of a save.
  if (const char* pause = std::getenv("LATHE_TEST_SAVE_PAUSE_MS"); pause != nullptr) {
    absl::SleepFor(absl::Milliseconds(std::atoi(pause)));
  }
  if (first) {
    json tensors = json::array();
    for (const std::string& part : all) {
      for (auto& e : json::parse(part)) tensors.push_back(std::move(e));
    }
    const TrainerInfo info = trainer.GetInfo();
    const int64_t created = absl::ToUnixMillis(absl::Now());
    json manifest = {{"format", kFormat}, {"run_id", meta.run_id}, {"name", meta.name},
                     {"base_model", meta.base_model}, {"architecture", info.architecture}, {"step", info.step},
                     {"policy_version", meta.policy_version},
                     {"created_unix_ms", created},
                     {"expires_unix_ms", ExpiryUnixMillis(created, meta.ttl_seconds)},
                     {"layout", {{"replicas", meta.replicas}, {"node_count", meta.node_count},
                                 {"devices_per_node", meta.devices_per_node}, {"tp", meta.tp}, {"ep", meta.ep},
                                 {"cp", meta.cp}}},
                     {"lora", LoraJson(info.lora)}, {"dtype", DtypeName(info.dtype)},
                     {"tensors", std::move(tensors)}};
    s = Commit(manifest, partial, dir, overwrite);
  }
  return Agree(s, group, timeout);
}

}  // namespace

absl::Status SaveCheckpoint(Trainer& trainer, const std::string& dir, bool overwrite, const CheckpointMeta& meta,
                            const ShardPlace& place, parallel::Communicator* group, absl::Duration timeout) {
  const std::string partial = dir + ".partial";
  const bool first = group == nullptr || group->rank() == 0;
  absl::Status s;
  if (first) {
    std::error_code ec;
    if (fs::exists(dir, ec) && !overwrite) {
      s = absl::AlreadyExistsError(absl::StrCat("checkpoint ", meta.name, " exists (ask for overwrite)"));
    } else {
      fs::remove_all(partial, ec);
      fs::create_directories(partial, ec);
      if (ec) s = absl::InternalError(absl::StrCat("cannot create ", partial, ": ", ec.message()));
    }
  }
  LATHE_RETURN_IF_ERROR(Agree(s, group, timeout));
  s = WriteAndCommit(trainer, dir, partial, overwrite, meta, place, group, timeout);
  if (!s.ok() && first) {
    // Every member has stopped writing (they agreed on the failure) unless one died or stalls.
    std::error_code ec;
    fs::remove_all(partial, ec);
  }
  return s;
}

}  // namespace lathe::runtime

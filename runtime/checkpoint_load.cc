// Checkpoint load: every slice of the manifest whose box meets this rank's
// part of a parameter is CRC-checked and copied into a staging tensor; the
// run's state changes only when every rank staged everything.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <array>
#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "parallel/data_parallel.h"
#include "runtime/adamw.h"
#include "runtime/checkpoint.h"
#include "core/crc32c.h"
#include "runtime/decoder_model.h"
#include "core/safetensors.h"
#include "core/status.h"
#include "runtime/trainer.h"

namespace lathe::runtime {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// A box [begin, end) per dim.
struct Box {
  std::vector<int64_t> begin, end;
  int64_t volume() const {
    int64_t v = 1;
    for (size_t d = 0; d < begin.size(); ++d) v *= std::max<int64_t>(0, end[d] - begin[d]);
    return v;
  }
};

Box BoxOf(const std::vector<int64_t>& global, int shard_dim, int64_t begin, int64_t extent) {
  Box b{std::vector<int64_t>(global.size(), 0), global};
  if (shard_dim >= 0) b.begin[shard_dim] = begin, b.end[shard_dim] = begin + extent;
  return b;
}

// One manifest's files, opened and CRC-checked once each.
class ShardReader {
 public:
  explicit ShardReader(std::string dir) : dir_(std::move(dir)) {}
  absl::StatusOr<at::Tensor> Read(const json& e) {
    const std::string file = e.at("file").get<std::string>();
    auto it = files_.find(file);
    if (it == files_.end()) {
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(dir_ + "/" + file);
      if (!f.ok()) return absl::DataLossError(absl::StrCat(dir_, "/", file, ": ", f.status().message()));
      it = files_.emplace(file, *std::move(f)).first;
    }
    const std::string name = e.at("tensor").get<std::string>();
    absl::StatusOr<TensorView> v = it->second->Get(name);
    if (!v.ok() || v->offset != e.at("offset").get<size_t>() || v->nbytes != e.at("nbytes").get<size_t>() ||
        v->dtype != "F32") {
      return absl::DataLossError(absl::StrCat(dir_, "/", file, ": tensor ", name, " is not where the manifest says"));
    }
    if (Crc32c(v->data, v->nbytes) != e.at("crc32c").get<uint32_t>()) {
      return absl::DataLossError(absl::StrCat(dir_, "/", file, ": tensor ", name, " fails its checksum"));
    }
    return at::from_blob(const_cast<uint8_t*>(v->data), v->shape, at::kFloat);
  }

 private:
  std::string dir_;
  std::map<std::string, std::unique_ptr<SafetensorsFile>> files_;
};

absl::StatusOr<json> ReadManifest(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return absl::NotFoundError(absl::StrCat("no checkpoint at ", dir));
  std::ifstream in(dir + "/manifest.json");
  if (!in) return absl::DataLossError(absl::StrCat(dir, "/manifest.json is missing"));
  json m = json::parse(in, nullptr, /*allow_exceptions=*/false);
  // Checked by type before any value is read: json::value() throws on a
  // "format" that is not a string.
  const auto format = m.is_object() ? m.find("format") : m.end();
  if (!m.is_object() || format == m.end() || !format->is_string() || *format != "lathe-checkpoint-1" ||
      !m.contains("tensors") || !m["tensors"].is_array() || !m.contains("lora") || !m["lora"].is_object()) {
    return absl::DataLossError(absl::StrCat(dir, "/manifest.json is not a lathe checkpoint manifest"));
  }
  return m;
}

absl::Status CheckLora(const json& saved, const LoraSettings& run) {
  if (saved.at("rank").get<int64_t>() != run.rank || saved.at("train_attn").get<bool>() != run.train_attn ||
      saved.at("train_mlp").get<bool>() != run.train_mlp ||
      saved.at("train_unembed").get<bool>() != run.train_unembed) {
    return absl::FailedPreconditionError(absl::StrCat("the checkpoint's LoRA config ", saved.dump(),
                                                      " differs from the run's (rank ", run.rank, ")"));
  }
  return absl::OkStatus();
}

// One copy from a verified slice (a view of the mapped file) into a region of
// this rank's tensor.
struct Copy {
  at::Tensor from;
  std::vector<int64_t> to_begin;
};

// Plans the copies that fill this rank's part of one tensor kind from the
// manifest's slices (each slice CRC-checked once); copies nothing yet.
absl::Status Stage(const TrainableParam& p, const std::string& kind, const std::vector<const json*>& entries,
                   ShardReader& reader, std::vector<Copy>& plan, int64_t* adam_step) {
  const std::vector<int64_t> global = [&] {
    std::vector<int64_t> g(p.tensor.sizes().begin(), p.tensor.sizes().end());
    if (p.shard_dim >= 0) g[p.shard_dim] = p.full_size;
    return g;
  }();
  const Box mine = BoxOf(global, p.shard_dim, p.shard_begin, p.shard_dim < 0 ? 0 : p.tensor.size(p.shard_dim));
  int64_t covered = 0;
  for (const json* e : entries) {
    if (e->at("global_shape").get<std::vector<int64_t>>() != global) {
      return absl::FailedPreconditionError(absl::StrCat(p.name, " has shape ", e->at("global_shape").dump(),
                                                        " in the checkpoint"));
    }
    LATHE_ASSIGN_OR_RETURN(at::Tensor src, reader.Read(*e));
    const int sd = e->at("shard_dim").get<int>();
    if (src.dim() != static_cast<int64_t>(global.size()) || sd >= src.dim()) {
      return absl::DataLossError(absl::StrCat("slice of ", p.name, " has ", src.dim(), " dims"));
    }
    const Box slice = BoxOf(global, sd, e->at("begin").get<int64_t>(), sd < 0 ? 0 : src.size(sd));
    for (size_t d = 0; d < global.size(); ++d) {
      if (src.size(d) != slice.end[d] - slice.begin[d] || slice.end[d] > global[d]) {
        return absl::DataLossError(absl::StrCat("a slice of ", p.name, " does not fit its global shape"));
      }
    }
    Box both{std::vector<int64_t>(global.size()), std::vector<int64_t>(global.size())};
    for (size_t d = 0; d < global.size(); ++d) {
      both.begin[d] = std::max(mine.begin[d], slice.begin[d]);
      both.end[d] = std::min(mine.end[d], slice.end[d]);
    }
    if (both.volume() == 0) continue;
    Copy copy{src, std::vector<int64_t>(global.size())};
    for (size_t d = 0; d < global.size(); ++d) {
      copy.from = copy.from.narrow(d, both.begin[d] - slice.begin[d], both.end[d] - both.begin[d]);
      copy.to_begin[d] = both.begin[d] - mine.begin[d];
    }
    plan.push_back(std::move(copy));
    covered += both.volume();
    if (adam_step != nullptr && e->contains("adam_step")) *adam_step = e->at("adam_step").get<int64_t>();
  }
  if (covered != mine.volume()) {
    return absl::DataLossError(absl::StrCat("the checkpoint holds ", covered, " of the ", mine.volume(),
                                            " elements of ", kind, " ", p.name, " this rank needs"));
  }
  return absl::OkStatus();
}

void Apply(const std::vector<Copy>& plan, at::Tensor& to) {
  for (const Copy& c : plan) {
    at::Tensor region = to;
    for (size_t d = 0; d < c.to_begin.size(); ++d) region = region.narrow(d, c.to_begin[d], c.from.size(d));
    region.copy_(c.from);
  }
}

// Everything a rank will copy once every rank verified its slices; the reader
// keeps the files mapped until then.
struct Staged {
  std::unique_ptr<ShardReader> reader;
  std::vector<std::vector<Copy>> params;
  std::vector<std::array<std::vector<Copy>, 2>> moments;  // empty: no optimizer state to restore
  std::vector<int64_t> adam_steps;
  int64_t step = 0;
};

absl::StatusOr<Staged> StageAll(const Trainer& trainer, const std::string& dir, bool with_optimizer) {
  LATHE_ASSIGN_OR_RETURN(json manifest, ReadManifest(dir));
  LATHE_RETURN_IF_ERROR(CheckLora(manifest.at("lora"), trainer.GetInfo().lora));
  std::map<std::pair<std::string, std::string>, std::vector<const json*>> by_name;
  for (const json& e : manifest.at("tensors")) {
    by_name[{e.at("kind").get<std::string>(), e.at("name").get<std::string>()}].push_back(&e);
  }
  const std::vector<TrainableParam>& params = trainer.model().trainable();
  Staged staged;
  staged.reader = std::make_unique<ShardReader>(dir);
  ShardReader& reader = *staged.reader;
  staged.step = with_optimizer ? manifest.at("step").get<int64_t>() : 0;
  const bool moments = with_optimizer && by_name.count({"exp_avg", params.empty() ? "" : params[0].name}) > 0;
  for (const TrainableParam& p : params) {
    auto it = by_name.find({"param", p.name});
    if (it == by_name.end()) return absl::FailedPreconditionError(absl::StrCat("the checkpoint has no ", p.name));
    LATHE_RETURN_IF_ERROR(Stage(p, "param", it->second, reader, staged.params.emplace_back(), nullptr));
    if (!moments) continue;
    auto& plans = staged.moments.emplace_back();
    int64_t& adam_step = staged.adam_steps.emplace_back(0);
    for (int k = 0; k < 2; ++k) {
      const char* kind = k == 0 ? "exp_avg" : "exp_avg_sq";
      auto m = by_name.find({kind, p.name});
      if (m == by_name.end()) return absl::DataLossError(absl::StrCat(dir, ": no ", kind, " of ", p.name));
      LATHE_RETURN_IF_ERROR(Stage(p, kind, m->second, reader, plans[k], k == 0 ? &adam_step : nullptr));
    }
  }
  return staged;
}

}  // namespace

absl::StatusOr<LoraSettings> ReadCheckpointLora(const std::string& dir) {
  LATHE_ASSIGN_OR_RETURN(json manifest, ReadManifest(dir));
  const json& l = manifest.at("lora");
  auto is = [&l](const char* key, bool (json::*type)() const) { return l.contains(key) && (l.at(key).*type)(); };
  if (!is("rank", &json::is_number_integer) || !is("alpha", &json::is_number) ||
      !is("seed", &json::is_number_unsigned) || !is("train_attn", &json::is_boolean) ||
      !is("train_mlp", &json::is_boolean) || !is("train_unembed", &json::is_boolean)) {
    return absl::DataLossError(absl::StrCat(dir, "/manifest.json: its lora entry is not a LoRA config"));
  }
  LoraSettings settings;
  settings.rank = l.at("rank").get<int64_t>();
  settings.alpha = l.at("alpha").get<double>();
  settings.seed = l.at("seed").get<uint64_t>();
  settings.train_attn = l.at("train_attn").get<bool>();
  settings.train_mlp = l.at("train_mlp").get<bool>();
  settings.train_unembed = l.at("train_unembed").get<bool>();
  if (settings.rank < 0 || !(settings.alpha > 0)) {
    return absl::DataLossError(absl::StrCat(dir, "/manifest.json: its lora entry is out of range"));
  }
  return settings;
}

absl::StatusOr<std::vector<at::Tensor>> ReadCheckpointParams(const Trainer& trainer, const std::string& dir) {
  try {
    LATHE_ASSIGN_OR_RETURN(Staged staged, StageAll(trainer, dir, /*with_optimizer=*/false));
    std::vector<at::Tensor> out;
    const std::vector<TrainableParam>& params = trainer.model().trainable();
    for (size_t i = 0; i < params.size(); ++i) {
      out.push_back(at::empty_like(params[i].tensor).detach());
      Apply(staged.params[i], out.back());
    }
    return out;
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat(dir, ": ", e.what()));
  }
}

absl::StatusOr<std::map<std::string, at::Tensor>> ReadCheckpointTensors(const std::string& dir,
                                                                       const std::string& kind) {
  LATHE_ASSIGN_OR_RETURN(json manifest, ReadManifest(dir));
  std::map<std::string, at::Tensor> out;
  // Every manifest read is inside: a field of the wrong type throws json::type_error.
  try {
    std::map<std::string, std::vector<const json*>> by_name;
    for (const json& e : manifest.at("tensors")) {
      if (e.at("kind").get<std::string>() == kind) by_name[e.at("name").get<std::string>()].push_back(&e);
    }
    ShardReader reader(dir);
    for (const auto& [name, entries] : by_name) {
      // A whole, unsharded parameter of the global shape stands for the full tensor.
      TrainableParam whole;
      whole.name = name;
      whole.tensor = at::empty(entries.front()->at("global_shape").get<std::vector<int64_t>>(), at::kFloat);
      std::vector<Copy> plan;
      LATHE_RETURN_IF_ERROR(Stage(whole, kind, entries, reader, plan, nullptr));
      Apply(plan, whole.tensor);
      out[name] = whole.tensor;
    }
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat(dir, ": ", e.what()));
  }
  return out;
}

absl::StatusOr<int64_t> LoadCheckpoint(Trainer& trainer, const std::string& dir, bool with_optimizer,
                                       parallel::Communicator* world, absl::Duration timeout) {
  absl::StatusOr<Staged> staged;
  try {
    staged = StageAll(trainer, dir, with_optimizer);
  } catch (const std::exception& e) {  // c10::Error, or a manifest field of the wrong type
    staged = absl::DataLossError(absl::StrCat(dir, ": ", e.what()));
  }
  // Either every rank applies its part or none does.
  if (world != nullptr) LATHE_RETURN_IF_ERROR(parallel::AgreeStatus(staged.status(), *world, timeout));
  LATHE_RETURN_IF_ERROR(staged.status());
  at::NoGradGuard no_grad;
  std::vector<TrainableParam>& params = trainer.model().trainable();
  std::vector<AdamW::State> states;
  for (size_t i = 0; i < params.size(); ++i) {
    Apply(staged->params[i], params[i].tensor);
    params[i].tensor.mutable_grad() = at::Tensor();
    if (staged->moments.empty()) continue;
    AdamW::State& s = states.emplace_back();
    s.exp_avg = at::empty_like(params[i].tensor);
    s.exp_avg_sq = at::empty_like(params[i].tensor);
    s.step = staged->adam_steps[i];
    Apply(staged->moments[i][0], s.exp_avg);
    Apply(staged->moments[i][1], s.exp_avg_sq);
  }
  // The bf16 copies of fp32 masters follow them (whatever dtype the
  // checkpoint was written under: its tensors are fp32 either way).
  FoldComputeGradients(params);
  for (TrainableParam& p : params) p.tensor.mutable_grad() = at::Tensor();
  RefreshComputeCopies(params);
  if (states.empty()) {
    trainer.optimizer().Reset();  // without moments (none saved yet, or not asked for) a fresh optimizer
  } else {
    trainer.optimizer().Restore(staged->step, std::move(states));
  }
  return trainer.optimizer().step();
}

}  // namespace lathe::runtime

// Folds a LoRA adapter into a copy of the base model's files; see peft_merge.h.
#include "runtime/peft_merge.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "nlohmann/json.hpp"
#include "core/safetensors.h"
#include "core/status.h"

namespace lathe::runtime {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using LoraPair = std::pair<at::Tensor, at::Tensor>;  // (A, B)

// The embedding of the text model, in the plain and in the multimodal layout.
constexpr const char* kEmbeds[] = {"model.embed_tokens.weight", "model.language_model.embed_tokens.weight"};
constexpr char kLmHead[] = "lm_head.weight";
constexpr char kConfig[] = "config.json";
constexpr char kIndex[] = "model.safetensors.index.json";

// Per adapted weight ("...q_proj.weight"): its (A, B), experts one by one.
std::map<std::string, LoraPair> Pairs(const std::map<std::string, at::Tensor>& params) {
  std::map<std::string, LoraPair> pairs;
  for (const auto& [name, t] : params) {
    const bool is_a = name.find(".lora_A.weight") != std::string::npos;
    auto put = [&](const std::string& n, const at::Tensor& v) {
      const std::string base = absl::StrReplaceAll(n, {{is_a ? ".lora_A.weight" : ".lora_B.weight", ".weight"}});
      (is_a ? pairs[base].first : pairs[base].second) = v;
    };
    if (name.find("{e}") == std::string::npos) {
      put(name, t);
    } else {
      for (int64_t e = 0; e < t.size(0); ++e) {
        put(absl::StrReplaceAll(name, {{"{e}", absl::StrCat(e)}}), t.select(0, e));
      }
    }
  }
  return pairs;
}

absl::StatusOr<at::ScalarType> TorchType(const TensorView& v) {
  if (v.dtype == "F32") return at::kFloat;
  if (v.dtype == "BF16") return at::kBFloat16;
  if (v.dtype == "F16") return at::kHalf;
  if (absl::StartsWith(v.dtype, "F8")) {
    return absl::FailedPreconditionError(absl::StrCat("cannot merge into ", v.name, ": the base stores it quantized (",
                                                      v.dtype, "); merging would need re-quantizing"));
  }
  return absl::FailedPreconditionError(absl::StrCat("cannot merge into ", v.name, ", a ", v.dtype, " tensor"));
}

absl::StatusOr<json> ReadJson(const fs::path& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path.string()));
  json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::DataLossError(absl::StrCat(path.string(), " is not a JSON object"));
  }
  return j;
}

absl::Status WriteJson(const fs::path& path, const json& j) {
  std::ofstream out(path);
  out << j.dump(2) << "\n";
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

// The base folder: its safetensors files (mapped), the file holding each
// tensor, its other files, whether its config ties lm_head to the embedding,
// and the embedding's name.
struct BaseModel {
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::map<std::string, const SafetensorsFile*> holder;
  std::vector<fs::path> others;
  bool tied = false;
  std::string embed = kEmbeds[0];
};

// The safetensors files the model loads from, as SafetensorsCheckpoint reads
// them: the shards the index names, else model.safetensors.
absl::StatusOr<std::set<fs::path>> LoadedFiles(const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(fs::path(dir) / kIndex, ec)) return std::set<fs::path>{fs::path(dir) / "model.safetensors"};
  LATHE_ASSIGN_OR_RETURN(json index, ReadJson(fs::path(dir) / kIndex));
  auto map = index.find("weight_map");
  if (map == index.end() || !map->is_object()) {
    return absl::DataLossError(absl::StrCat(dir, "/", kIndex, " has no weight_map object"));
  }
  std::set<fs::path> files;
  for (const auto& [tensor, shard] : map->items()) {
    if (!shard.is_string()) return absl::DataLossError(absl::StrCat(dir, "/", kIndex, ": ", tensor, " names no file"));
    files.insert(fs::path(dir) / shard.get<std::string>());
  }
  return files;
}

absl::StatusOr<BaseModel> OpenBase(const std::string& dir) {
  BaseModel base;
  LATHE_ASSIGN_OR_RETURN(const std::set<fs::path> loaded, LoadedFiles(dir));
  std::vector<fs::path> tensor_files;
  std::error_code ec, type_ec;
  for (const fs::directory_entry& f : fs::directory_iterator(dir, ec)) {
    if (!f.is_regular_file(type_ec)) continue;
    // Other safetensors files (e.g. a consolidated copy in another naming)
    // are not the model: neither merged nor copied.
    if (f.path().extension() == ".safetensors") {
      if (loaded.count(f.path())) tensor_files.push_back(f.path());
      continue;
    }
    base.others.push_back(f.path());
  }
  if (ec) return absl::InternalError(absl::StrCat("cannot list ", dir, ": ", ec.message()));
  std::sort(tensor_files.begin(), tensor_files.end());
  for (const fs::path& p : tensor_files) {
    LATHE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(p.string()));
    for (const std::string& name : file->names()) base.holder.emplace(name, file.get());
    base.files.push_back(std::move(file));
  }
  for (const char* embed : kEmbeds) {
    if (base.holder.count(embed)) {
      base.embed = embed;
      break;
    }
  }
  if (fs::exists(fs::path(dir) / kConfig, ec)) {
    LATHE_ASSIGN_OR_RETURN(json config, ReadJson(fs::path(dir) / kConfig));
    auto tie = config.find("tie_word_embeddings");
    base.tied = tie != config.end() && tie->is_boolean() && tie->get<bool>();
  }
  return base;
}

// The base tensor `name` (the adapted weight) starts from: the embedding for
// the head of a tied model that gets its own head.
std::string Source(const std::string& name, bool untie, const BaseModel& base) {
  return untie && name == kLmHead ? base.embed : name;
}

// One adapter's product B·A added to rows [row, row + rows of B) of a base
// tensor, or of its expert `expert` (-1: the tensor itself is the matrix).
struct MergePart {
  LoraPair ab;
  int64_t expert = -1;
  int64_t row = 0;
};
// By the name of the tensor written, the products merged into it.
using Merges = std::map<std::string, std::vector<MergePart>>;

absl::Status ShapeMismatch(const std::string& source, const std::vector<int64_t>& shape, const std::string& name,
                           const std::vector<int64_t>& want) {
  return absl::FailedPreconditionError(absl::StrCat("the base model's ", source, " is [", absl::StrJoin(shape, ", "),
                                                    "], the adapter's ", name, " [", absl::StrJoin(want, ", "), "]"));
}

// Where expert e's gate/up/down projection `name` ("<p>.mlp.experts.<e>.<proj>.weight")
// lives in a base that stores the layer's experts fused, as transformers holds them:
// gate_up_proj [E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I]. Nullopt
// when `name` is no expert projection or the base has no fused tensor for it.
absl::StatusOr<std::optional<std::pair<std::string, MergePart>>> FusedExpert(const std::string& name,
                                                                              const LoraPair& ab,
                                                                              const BaseModel& base) {
  constexpr char kExperts[] = ".mlp.experts.";
  const size_t at = name.find(kExperts);
  if (at == std::string::npos) return std::nullopt;
  const std::string experts = name.substr(0, at + std::strlen(kExperts) - 1);
  const std::string rest = name.substr(at + std::strlen(kExperts));  // "<e>.<proj>.weight"
  const size_t dot = rest.find('.');
  if (dot == std::string::npos || dot == 0 ||
      rest.find_first_not_of("0123456789") != dot) {
    return std::nullopt;
  }
  const int64_t e = std::stoll(rest.substr(0, dot));
  const std::string proj = rest.substr(dot + 1);
  const bool down = proj == "down_proj.weight";
  if (!down && proj != "gate_proj.weight" && proj != "up_proj.weight") return std::nullopt;
  for (const char* suffix : {"", ".weight"}) {
    const std::string fused = absl::StrCat(experts, down ? ".down_proj" : ".gate_up_proj", suffix);
    auto it = base.holder.find(fused);
    if (it == base.holder.end()) continue;
    LATHE_ASSIGN_OR_RETURN(TensorView v, it->second->Get(fused));
    LATHE_RETURN_IF_ERROR(TorchType(v).status());
    const int64_t rows = ab.second.size(0), cols = ab.first.size(1);
    const std::vector<int64_t> want = {v.shape.empty() ? 0 : v.shape[0], down ? rows : 2 * rows, cols};
    if (v.shape.size() != 3 || v.shape[1] != want[1] || v.shape[2] != cols || e >= v.shape[0]) {
      return ShapeMismatch(fused, v.shape, name, {rows, cols});
    }
    const int64_t row = proj == "up_proj.weight" ? rows : 0;
    return std::optional<std::pair<std::string, MergePart>>({fused, MergePart{ab, e, row}});
  }
  return std::nullopt;
}

// Where every adapted weight merges into: its base tensor of its shape (in a dtype we
// merge into), or its slice of the layer's fused experts.
absl::StatusOr<Merges> Resolve(const std::map<std::string, LoraPair>& pairs, const BaseModel& base, bool untie,
                               const std::string& dir) {
  Merges merges;
  for (const auto& [name, ab] : pairs) {
    const std::string source = Source(name, untie, base);
    auto it = base.holder.find(source);
    if (it == base.holder.end()) {
      LATHE_ASSIGN_OR_RETURN(auto fused, FusedExpert(source, ab, base));
      if (!fused.has_value()) {
        if (const std::string packed = source + "_packed"; base.holder.count(packed)) {
          return absl::FailedPreconditionError(absl::StrCat("cannot merge into ", source,
                                                            ": the base stores it quantized (", packed,
                                                            ", pack-quantized); merging would need re-quantizing"));
        }
        return absl::FailedPreconditionError(
            absl::StrCat("the base model in ", dir, " has no tensor ", source, " to merge into"));
      }
      merges[fused->first].push_back(std::move(fused->second));
      continue;
    }
    LATHE_ASSIGN_OR_RETURN(TensorView v, it->second->Get(source));
    LATHE_RETURN_IF_ERROR(TorchType(v).status());
    const std::vector<int64_t> want = {ab.second.size(0), ab.first.size(1)};
    if (v.shape != want) return ShapeMismatch(source, v.shape, name, want);
    merges[name].push_back(MergePart{ab});  // by the tensor written (the untied head: its own)
  }
  return merges;
}

// The dtype a tensor is written in: its own, or BF16 for a floating one under `bf16`.
std::string OutDtype(const TensorView& v, bool bf16) {
  return bf16 && (v.dtype == "F32" || v.dtype == "F16") ? "BF16" : v.dtype;
}

at::ScalarType TypeOf(const std::string& dtype) {
  return dtype == "BF16" ? at::kBFloat16 : dtype == "F16" ? at::kHalf : at::kFloat;
}

// base + scale·B·A of every part, in `out` (BF16, F16 or F32; the base's is checked by Resolve).
at::Tensor Merge(const TensorView& base, const std::vector<MergePart>& parts, double scale, const std::string& out) {
  const at::ScalarType type = *TorchType(base);
  // A copy: the mapping is read-only, and .to() of an F32 tensor would alias it.
  at::Tensor w = at::from_blob(const_cast<uint8_t*>(base.data), base.shape, type).to(at::kFloat, false, true);
  for (const MergePart& p : parts) {
    at::Tensor matrix = p.expert >= 0 ? w.select(0, p.expert) : w;
    matrix.narrow(0, p.row, p.ab.second.size(0)).add_(at::matmul(p.ab.second, p.ab.first), scale);
  }
  return w.to(TypeOf(out)).contiguous();
}

// Writes `in` to `out` with the adapted weights merged; with `untie`, the
// file holding the embedding also gets the model's own lm_head.
absl::Status WriteMergedFile(const SafetensorsFile& in, const Merges& merges, const std::string& embed,
                             double scale, bool untie, bool bf16, const fs::path& out) {
  std::vector<at::Tensor> keep;
  std::vector<TensorToWrite> tensors;
  auto put = [&](const std::string& name, const TensorView& v) {
    const std::string dtype = OutDtype(v, bf16);
    auto it = merges.find(name);
    if (it == merges.end() && dtype == v.dtype) {
      tensors.push_back({name, v.dtype, v.shape, v.data, v.nbytes});
      return;
    }
    if (it == merges.end()) {
      keep.push_back(at::from_blob(const_cast<uint8_t*>(v.data), v.shape, *TorchType(v)).to(TypeOf(dtype)).contiguous());
    } else {
      keep.push_back(Merge(v, it->second, scale, dtype));
    }
    tensors.push_back({name, dtype, v.shape, keep.back().data_ptr(), static_cast<size_t>(keep.back().nbytes())});
  };
  for (const std::string& name : in.names()) {
    if (untie && name == kLmHead) continue;  // a stored copy of the tied head: replaced below
    LATHE_ASSIGN_OR_RETURN(TensorView v, in.Get(name));
    put(name, v);
  }
  if (untie && in.Contains(embed)) {
    LATHE_ASSIGN_OR_RETURN(TensorView embedding, in.Get(embed));
    put(kLmHead, embedding);
  }
  return WriteSafetensors(out.string(), tensors, in.metadata());
}

int64_t Numel(const TensorView& v) {
  int64_t n = 1;
  for (int64_t d : v.shape) n *= d;
  return n;
}

// The sharded base's index with lm_head in `head_file` and its totals (bytes,
// parameters) counting the new head.
absl::Status WriteUntiedIndex(const fs::path& from, const fs::path& to, const BaseModel& base,
                              const std::string& head_file) {
  LATHE_ASSIGN_OR_RETURN(json index, ReadJson(from));
  if (!index.contains("weight_map") || !index["weight_map"].is_object()) {
    return absl::DataLossError(absl::StrCat(from.string(), " has no weight_map"));
  }
  index["weight_map"][kLmHead] = head_file;
  const TensorView embed = *base.holder.at(base.embed)->Get(base.embed);
  int64_t bytes = static_cast<int64_t>(embed.nbytes), numel = Numel(embed);
  if (auto old = base.holder.find(kLmHead); old != base.holder.end()) {
    const TensorView head = *old->second->Get(kLmHead);
    bytes -= static_cast<int64_t>(head.nbytes);
    numel -= Numel(head);
  }
  auto meta = index.find("metadata");
  for (const auto& [key, added] : {std::pair{"total_size", bytes}, {"total_parameters", numel}}) {
    if (meta == index.end() || !meta->is_object()) break;
    auto total = meta->find(key);
    if (total != meta->end() && total->is_number_integer()) *total = total->get<int64_t>() + added;
  }
  return WriteJson(to, index);
}

// config.json, untied and/or saying bfloat16.
absl::Status WriteConfig(const fs::path& from, const fs::path& to, bool untie, bool bf16) {
  LATHE_ASSIGN_OR_RETURN(json config, ReadJson(from));
  if (untie) config["tie_word_embeddings"] = false;
  if (bf16) {
    config["torch_dtype"] = "bfloat16";
    if (config.contains("dtype")) config["dtype"] = "bfloat16";
  }
  return WriteJson(to, config);
}

}  // namespace

absl::Status WriteMergedModel(const std::map<std::string, at::Tensor>& params, double scale,
                              const std::string& base_dir, const std::string& out, bool bf16) {
  const std::map<std::string, LoraPair> pairs = Pairs(params);
  LATHE_ASSIGN_OR_RETURN(BaseModel base, OpenBase(base_dir));
  const bool untie = base.tied && pairs.count(kLmHead) > 0;
  LATHE_ASSIGN_OR_RETURN(const Merges merges, Resolve(pairs, base, untie, base_dir));
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", out, ": ", ec.message()));
  for (const std::unique_ptr<SafetensorsFile>& file : base.files) {
    const fs::path name = fs::path(file->path()).filename();
    LATHE_RETURN_IF_ERROR(WriteMergedFile(*file, merges, base.embed, scale, untie, bf16, fs::path(out) / name));
  }
  for (const fs::path& from : base.others) {
    const fs::path to = fs::path(out) / from.filename();
    if ((untie || bf16) && from.filename() == kConfig) {
      LATHE_RETURN_IF_ERROR(WriteConfig(from, to, untie, bf16));
    } else if (untie && from.filename() == kIndex) {
      const std::string head_file = fs::path(base.holder.at(base.embed)->path()).filename().string();
      LATHE_RETURN_IF_ERROR(WriteUntiedIndex(from, to, base, head_file));
    } else {
      fs::copy_file(from, to, fs::copy_options::overwrite_existing, ec);
      if (ec) return absl::InternalError(absl::StrCat("cannot copy ", from.string(), ": ", ec.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace lathe::runtime

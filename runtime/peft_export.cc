// PEFT adapter files from whole LoRA tensors.
#include "runtime/peft_export.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "runtime/safetensors.h"
#include "runtime/saturating.h"
#include "runtime/status.h"

namespace lathe::runtime {
namespace {

namespace fs = std::filesystem;

// "model.layers.0.self_attn.q_proj.lora_A.weight" -> "q_proj".
std::string TargetModule(const std::string& name) {
  std::vector<std::string> parts = absl::StrSplit(name, '.');
  return parts.size() >= 3 ? parts[parts.size() - 3] : name;
}

// Per adapted weight ("...q_proj.weight"): its (A, B), experts one by one.
std::map<std::string, std::pair<at::Tensor, at::Tensor>> Pairs(const std::map<std::string, at::Tensor>& params) {
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> pairs;
  for (const auto& [name, t] : params) {
    const bool is_a = name.find(".lora_A.weight") != std::string::npos;
    auto put = [&](const std::string& n, const at::Tensor& v) {
      const std::string base = absl::StrReplaceAll(n, {{is_a ? ".lora_A.weight" : ".lora_B.weight", ".weight"}});
      (is_a ? pairs[base].first : pairs[base].second) = v;
    };
    if (name.find("{e}") == std::string::npos) {
      put(name, t);
    } else {
      for (int64_t e = 0; e < t.size(0); ++e) put(absl::StrReplaceAll(name, {{"{e}", absl::StrCat(e)}}), t.select(0, e));
    }
  }
  return pairs;
}

absl::StatusOr<at::ScalarType> TorchType(const std::string& dtype) {
  if (dtype == "F32") return at::kFloat;
  if (dtype == "BF16") return at::kBFloat16;
  if (dtype == "F16") return at::kHalf;
  return absl::FailedPreconditionError(absl::StrCat("cannot merge into a ", dtype, " tensor"));
}

absl::Status WriteMerged(const std::map<std::string, at::Tensor>& params, const LoraSettings& lora,
                         const std::string& base_dir, const std::string& out) {
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> pairs = Pairs(params);
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", out, ": ", ec.message()));
  for (const fs::directory_entry& f : fs::directory_iterator(base_dir, ec)) {
    const std::string file = f.path().filename().string();
    if (!f.is_regular_file()) continue;
    if (f.path().extension() != ".safetensors") {
      fs::copy_file(f.path(), fs::path(out) / file, fs::copy_options::overwrite_existing, ec);
      if (ec) return absl::InternalError(absl::StrCat("cannot copy ", file, ": ", ec.message()));
      continue;
    }
    LATHE_ASSIGN_OR_RETURN(auto in, SafetensorsFile::Open(f.path().string()));
    std::vector<at::Tensor> keep;
    std::vector<TensorToWrite> tensors;
    for (const std::string& name : in->names()) {
      LATHE_ASSIGN_OR_RETURN(TensorView v, in->Get(name));
      const void* data = v.data;
      size_t nbytes = v.nbytes;
      auto it = pairs.find(name);
      if (it != pairs.end()) {
        LATHE_ASSIGN_OR_RETURN(at::ScalarType type, TorchType(v.dtype));
        // A copy: the mapping is read-only, and .to() of an F32 tensor would alias it.
        at::Tensor w = at::from_blob(const_cast<uint8_t*>(v.data), v.shape, type).to(at::kFloat, false, true);
        w.add_(at::matmul(it->second.second, it->second.first), lora.scale());
        keep.push_back(w.to(type).contiguous());
        data = keep.back().data_ptr(), nbytes = static_cast<size_t>(keep.back().nbytes());
        pairs.erase(it);
      }
      tensors.push_back({name, v.dtype, v.shape, data, nbytes});
    }
    LATHE_RETURN_IF_ERROR(WriteSafetensors((fs::path(out) / file).string(), tensors, in->metadata()));
  }
  if (!pairs.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("the base model has no tensor ", pairs.begin()->first,
                                                      " to merge into (experts stored fused are not supported)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WritePeftAdapter(const std::map<std::string, at::Tensor>& params, const LoraSettings& lora,
                              const std::string& base_model, const std::string& dir,
                              const std::string& merge_base_dir, int64_t ttl_seconds) {
  if (lora.full_finetune()) {
    return absl::FailedPreconditionError("a full fine-tuning run has no adapter to export");
  }
  std::error_code ec;
  if (fs::exists(dir, ec)) return absl::AlreadyExistsError(absl::StrCat(dir, " exists"));
  std::vector<at::Tensor> keep;
  std::vector<TensorToWrite> tensors;
  std::set<std::string> targets;
  auto add = [&](const std::string& name, const at::Tensor& t) {
    keep.push_back(t.contiguous());
    tensors.push_back({"base_model.model." + name, "F32", std::vector<int64_t>(t.sizes().begin(), t.sizes().end()),
                       keep.back().data_ptr(), static_cast<size_t>(keep.back().nbytes())});
    targets.insert(TargetModule(name));
  };
  for (const auto& [name, t] : params) {
    if (name.find("{e}") == std::string::npos) {
      add(name, t);
      continue;
    }
    for (int64_t e = 0; e < t.size(0); ++e) add(absl::StrReplaceAll(name, {{"{e}", absl::StrCat(e)}}), t.select(0, e));
  }
  const std::string partial = dir + ".partial";
  fs::remove_all(partial, ec);
  fs::create_directories(partial, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", partial, ": ", ec.message()));
  LATHE_RETURN_IF_ERROR(WriteSafetensors(partial + "/adapter_model.safetensors", tensors));
  const nlohmann::json config = {
      {"peft_type", "LORA"}, {"task_type", "CAUSAL_LM"}, {"base_model_name_or_path", base_model},
      {"r", lora.rank}, {"lora_alpha", lora.alpha}, {"lora_dropout", 0.0}, {"bias", "none"},
      {"target_modules", std::vector<std::string>(targets.begin(), targets.end())},
      {"fan_in_fan_out", false}, {"inference_mode", true}, {"use_rslora", false}, {"init_lora_weights", true}};
  {
    std::ofstream out(partial + "/adapter_config.json");
    out << config.dump(2);
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", partial, "/adapter_config.json"));
  }
  {
    const int64_t now = absl::ToUnixMillis(absl::Now());
    std::ofstream out(partial + "/lathe_sampler.json");
    out << nlohmann::json{{"created_unix_ms", now},
                          {"expires_unix_ms", ExpiryUnixMillis(now, ttl_seconds)}}.dump();
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", partial, "/lathe_sampler.json"));
  }
  if (!merge_base_dir.empty()) LATHE_RETURN_IF_ERROR(WriteMerged(params, lora, merge_base_dir, partial + "/merged"));
  fs::rename(partial, dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot rename ", partial, ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace lathe::runtime

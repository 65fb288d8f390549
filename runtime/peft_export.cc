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
#include "nlohmann/json.hpp"
#include "runtime/safetensors.h"
#include "runtime/status.h"

namespace lathe::runtime {
namespace {

namespace fs = std::filesystem;

// "model.layers.0.self_attn.q_proj.lora_A.weight" -> "q_proj".
std::string TargetModule(const std::string& name) {
  std::vector<std::string> parts = absl::StrSplit(name, '.');
  return parts.size() >= 3 ? parts[parts.size() - 3] : name;
}

}  // namespace

absl::Status WritePeftAdapter(const std::map<std::string, at::Tensor>& params, const LoraSettings& lora,
                              const std::string& base_model, const std::string& dir) {
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
  fs::rename(partial, dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot rename ", partial, ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace lathe::runtime

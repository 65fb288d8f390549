// PEFT adapter files from whole LoRA tensors.
#include "runtime/peft_export.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "core/guarded.h"
#include "runtime/peft_merge.h"
#include "core/safetensors.h"
#include "core/saturating.h"
#include "core/status.h"

namespace lathe::runtime {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// "model.layers.0.self_attn.q_proj.lora_A.weight" -> "model.layers.0.self_attn.q_proj".
std::string Module(const std::string& name) {
  for (const char* suffix : {".lora_A.weight", ".lora_B.weight"}) {
    if (absl::EndsWith(name, suffix)) return name.substr(0, name.size() - std::strlen(suffix));
  }
  return name;
}

// "model.layers.0.self_attn.q_proj" -> "q_proj".
std::string Leaf(const std::string& module) {
  const size_t dot = module.rfind('.');
  return dot == std::string::npos ? module : module.substr(dot + 1);
}

// The module name peft finds in transformers' module tree for a checkpoint
// name: Kimi-K2.5's hub checkpoints hold the text model under
// language_model.model. and its head as language_model.lm_head, which
// transformers' Kimi_K25ForConditionalGeneration holds as
// model.language_model. and lm_head. Other names are the same in both.
std::string PeftName(const std::string& name) {
  for (auto [hub, module] : {std::pair{"language_model.model.", "model.language_model."},
                             std::pair{"language_model.lm_head.", "lm_head."}}) {
    if (absl::StartsWith(name, hub)) return module + name.substr(std::strlen(hub));
  }
  return name;
}

bool IsMlp(const std::string& leaf) { return leaf == "gate_proj" || leaf == "up_proj" || leaf == "down_proj"; }

// Adapters lathe trains on the parts of a fused projection, and the fused
// module PEFT knows: Gated DeltaNet's in_proj_qkv.
struct SplitAdapter {
  const char* fused;
  std::vector<const char*> parts;
};
const SplitAdapter kSplitAdapters[] = {{"in_proj_qkv", {"in_proj_q", "in_proj_k", "in_proj_v"}}};

// The parts' adapters joined into one on the fused module: A stacked
// ([n·r, in]) and B block-diagonal ([Σ out, n·r]), so B·A holds each part's
// product in its rows; at rank n·r and alpha n·α the scale is unchanged.
// Modules missing a part are left as they are.
std::map<std::string, at::Tensor> JoinSplitAdapters(std::map<std::string, at::Tensor> params) {
  for (const SplitAdapter& split : kSplitAdapters) {
    const std::string first = absl::StrCat(".", split.parts[0], ".lora_A.weight");
    std::vector<std::string> bases;
    for (const auto& [name, t] : params) {
      if (absl::EndsWith(name, first)) bases.push_back(name.substr(0, name.size() - first.size() + 1));
    }
    for (const std::string& base : bases) {
      std::vector<at::Tensor> a, b;
      for (const char* part : split.parts) {
        auto ia = params.find(absl::StrCat(base, part, ".lora_A.weight"));
        auto ib = params.find(absl::StrCat(base, part, ".lora_B.weight"));
        if (ia == params.end() || ib == params.end()) break;
        a.push_back(ia->second);
        b.push_back(ib->second);
      }
      if (a.size() != split.parts.size()) continue;
      for (const char* part : split.parts) {
        params.erase(absl::StrCat(base, part, ".lora_A.weight"));
        params.erase(absl::StrCat(base, part, ".lora_B.weight"));
      }
      params[absl::StrCat(base, split.fused, ".lora_A.weight")] = at::cat(a, 0);
      params[absl::StrCat(base, split.fused, ".lora_B.weight")] = at::block_diag(b);
    }
  }
  return params;
}

// The multimodal Qwen3.5-MoE layout (text tower under "model.language_model.") stores its
// experts fused, as transformers holds them, and transformers knows no conversion from
// per-expert names for it: peft loads the adapters of the fused parameters as they are.
// Those are gate_up_proj [E, 2I, H] at rank 2r (the inner ParamWrapper, module
// "mlp.experts.base_layer") and down_proj [E, H, I] at rank r (module "mlp.experts"); A is
// [E·r', in] (expert e's rank-j row at e·r' + j), B [out, r'·E] (its column at j·E + e).
// Gate and up join as in AdapterConfig: A stacked, B block-diagonal.
bool FusedExpertsLayout(const std::string& name) { return absl::StartsWith(name, "model.language_model."); }

std::map<std::string, at::Tensor> FuseExpertAdapters(std::map<std::string, at::Tensor> params) {
  constexpr char kStacked[] = ".{e}.";
  std::map<std::string, std::map<std::string, at::Tensor>> layers;  // "<p>.mlp.experts" -> "gate_proj.lora_A" -> [E, ...]
  for (const auto& [name, t] : params) {
    const size_t at = name.find(kStacked);
    if (at == std::string::npos || !FusedExpertsLayout(name)) continue;
    const std::string rest = name.substr(at + std::strlen(kStacked));
    layers[name.substr(0, at)][rest.substr(0, rest.size() - std::strlen(".weight"))] = t;
  }
  for (const auto& [experts, m] : layers) {
    const char* parts[] = {"gate_proj.lora_A", "gate_proj.lora_B", "up_proj.lora_A",
                           "up_proj.lora_B",   "down_proj.lora_A", "down_proj.lora_B"};
    if (!std::all_of(std::begin(parts), std::end(parts), [&](const char* p) { return m.count(p) > 0; })) continue;
    for (const char* p : parts) params.erase(absl::StrCat(experts, kStacked, p, ".weight"));
    const at::Tensor gate_b = m.at("gate_proj.lora_B"), up_b = m.at("up_proj.lora_B");
    const int64_t e = gate_b.size(0), inter = gate_b.size(1), r = gate_b.size(2);
    at::Tensor gate_up_a = at::cat({m.at("gate_proj.lora_A"), m.at("up_proj.lora_A")}, 1);  // [E, 2r, H]
    at::Tensor gate_up_b = at::zeros({e, 2 * inter, 2 * r}, gate_b.options());
    gate_up_b.narrow(1, 0, inter).narrow(2, 0, r).copy_(gate_b);
    gate_up_b.narrow(1, inter, inter).narrow(2, r, r).copy_(up_b);
    const at::Tensor down_a = m.at("down_proj.lora_A"), down_b = m.at("down_proj.lora_B");  // [E, r, I], [E, H, r]
    params[experts + ".base_layer.lora_A.weight"] = gate_up_a.reshape({-1, gate_up_a.size(2)});
    params[experts + ".base_layer.lora_B.weight"] = gate_up_b.permute({1, 2, 0}).reshape({2 * inter, -1});
    params[experts + ".lora_A.weight"] = down_a.reshape({-1, down_a.size(2)});
    params[experts + ".lora_B.weight"] = down_b.permute({1, 2, 0}).reshape({down_b.size(1), -1});
  }
  return params;
}

// adapter_config.json. transformers 5 holds a Qwen3-MoE model's experts fused
// (mlp.experts.gate_up_proj, mlp.experts.down_proj), and peft 0.21 rewrites
// every gate_proj/up_proj/down_proj of target_modules into those fused
// parameters, so the dense MLPs of layers without experts would silently lose
// their adapters. On a model with experts the MLP targets are therefore
// target_parameters: the fused experts (gate_up_proj at rank 2r and alpha 2α,
// gate and up side by side, the scale unchanged) and every dense MLP weight
// by its full name. peft fuses the per-expert tensors of the adapter file
// itself while loading.
json AdapterConfig(const std::map<std::string, at::Tensor>& params, const LoraSettings& lora,
                   const std::string& base_model) {
  bool experts = false;
  std::set<std::string> target_modules, dense_mlp;
  for (const auto& [name, t] : params) {
    const std::string module = Module(name);
    if (module.find("{e}") != std::string::npos) {
      experts = true;
    } else if (IsMlp(Leaf(module))) {
      dense_mlp.insert(module);
    } else {
      target_modules.insert(Leaf(module));
    }
  }
  std::set<std::string> target_parameters;
  for (const std::string& m : dense_mlp) {
    if (experts) {
      target_parameters.insert(PeftName(m) + ".weight");
    } else {
      target_modules.insert(Leaf(m));
    }
  }
  json config = {{"peft_type", "LORA"}, {"task_type", "CAUSAL_LM"}, {"base_model_name_or_path", base_model},
                 {"r", lora.rank}, {"lora_alpha", lora.alpha}, {"lora_dropout", 0.0}, {"bias", "none"},
                 {"fan_in_fan_out", false}, {"inference_mode", true}, {"use_rslora", false},
                 {"init_lora_weights", true}};
  config["target_modules"] = target_modules.empty() ? json(nullptr) : json(target_modules);
  json rank_pattern = json::object(), alpha_pattern = json::object();
  if (experts) {
    target_parameters.insert({"mlp.experts.gate_up_proj", "mlp.experts.down_proj"});
    config["target_parameters"] = target_parameters;
    rank_pattern[R"(.*\.gate_up_proj)"] = 2 * lora.rank;
    alpha_pattern[R"(.*\.gate_up_proj)"] = 2 * lora.alpha;
  }
  for (const SplitAdapter& split : kSplitAdapters) {
    if (target_modules.count(split.fused) == 0) continue;
    const auto n = static_cast<int64_t>(split.parts.size());
    rank_pattern[absl::StrCat(R"(.*\.)", split.fused)] = n * lora.rank;
    alpha_pattern[absl::StrCat(R"(.*\.)", split.fused)] = n * lora.alpha;
  }
  if (!rank_pattern.empty()) {
    config["rank_pattern"] = rank_pattern;
    config["alpha_pattern"] = alpha_pattern;
  }
  return config;
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

// Everything the export holds, into `folder`.
absl::Status WriteAdapterFolder(const std::map<std::string, at::Tensor>& on_device, const LoraSettings& lora,
                                const std::string& base_model, const std::string& merge_base_dir,
                                bool merged_bf16, int64_t ttl_seconds, const std::string& folder) {
  // Written (and merged with the base weights) from host memory.
  std::map<std::string, at::Tensor> params;
  for (const auto& [name, t] : on_device) params[name] = t.to(at::kCPU);
  params = JoinSplitAdapters(std::move(params));
  std::vector<at::Tensor> keep;
  std::vector<TensorToWrite> tensors;
  auto add = [&](const std::string& name, const at::Tensor& t) {
    keep.push_back(t.to(at::kFloat).contiguous());
    tensors.push_back({"base_model.model." + PeftName(name), "F32", std::vector<int64_t>(t.sizes().begin(), t.sizes().end()),
                       keep.back().data_ptr(), static_cast<size_t>(keep.back().nbytes())});
  };
  for (const auto& [name, t] : FuseExpertAdapters(params)) {
    if (name.find("{e}") == std::string::npos) {
      add(name, t);
      continue;
    }
    for (int64_t e = 0; e < t.size(0); ++e) add(absl::StrReplaceAll(name, {{"{e}", absl::StrCat(e)}}), t.select(0, e));
  }
  LATHE_RETURN_IF_ERROR(WriteSafetensors(folder + "/adapter_model.safetensors", tensors));
  LATHE_RETURN_IF_ERROR(WriteText(folder + "/adapter_config.json", AdapterConfig(params, lora, base_model).dump(2)));
  const int64_t now = absl::ToUnixMillis(absl::Now());
  const json sampler = {{"created_unix_ms", now}, {"expires_unix_ms", ExpiryUnixMillis(now, ttl_seconds)}};
  LATHE_RETURN_IF_ERROR(WriteText(folder + "/lathe_sampler.json", sampler.dump()));
  if (merge_base_dir.empty()) return absl::OkStatus();
  return WriteMergedModel(params, lora.scale(), merge_base_dir, folder + "/merged", merged_bf16);
}

}  // namespace

absl::Status WritePeftAdapter(const std::map<std::string, at::Tensor>& params, const LoraSettings& lora,
                              const std::string& dir, const PeftExportOptions& options) {
  if (lora.full_finetune()) {
    return absl::FailedPreconditionError("a full fine-tuning run has no adapter to export");
  }
  std::error_code ec;
  if (fs::exists(dir, ec)) return absl::AlreadyExistsError(absl::StrCat(dir, " exists"));
  const std::string partial = dir + ".partial";
  fs::remove_all(partial, ec);
  fs::create_directories(partial, ec);
  absl::Status s = ec ? absl::InternalError(absl::StrCat("cannot create ", partial, ": ", ec.message()))
                      : Guarded("save_weights_for_sampler", [&] {
                          return WriteAdapterFolder(params, lora, options.base_model, options.merge_base_dir,
                                                    options.merged_bf16, options.ttl_seconds, partial);
                        });
  if (s.ok() && !options.shards_dir.empty()) {
    fs::rename(options.shards_dir, partial + "/lathe", ec);
    if (ec) s = absl::InternalError(absl::StrCat("cannot move ", options.shards_dir, " in: ", ec.message()));
  }
  if (s.ok()) {
    fs::rename(partial, dir, ec);
    if (ec) s = absl::InternalError(absl::StrCat("cannot rename ", partial, ": ", ec.message()));
  }
  if (!s.ok() && !options.shards_dir.empty() && fs::exists(partial + "/lathe", ec)) {
    fs::rename(partial + "/lathe", options.shards_dir, ec);  // back where it was, for the caller
  }
  if (!s.ok()) fs::remove_all(partial, ec);
  return s;
}

}  // namespace lathe::runtime

// Random model folders; see tiny_model.h. The tensors are those the
// architecture loads, named and shaped by its own files (runtime/archs/).
#include "runtime/tiny_model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <map>
#include <fstream>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "runtime/decoder_model.h"
#include "core/model_config.h"
#include "core/safetensors.h"
#include "core/status.h"
#include "runtime/weight_source.h"

namespace lathe::runtime {
namespace {

nlohmann::json ConfigJson(const TinyModelSpec& s) {
  nlohmann::json j = {
      {"architectures", {s.moe ? "Qwen3MoeForCausalLM" : "Qwen3ForCausalLM"}},
      {"model_type", s.moe ? "qwen3_moe" : "qwen3"},
      {"vocab_size", s.vocab_size},
      {"hidden_size", s.hidden_size},
      {"intermediate_size", s.intermediate_size},
      {"num_hidden_layers", s.num_layers},
      {"num_attention_heads", s.num_heads},
      {"num_key_value_heads", s.num_kv_heads},
      {"head_dim", s.head_dim},
      {"hidden_act", "silu"},
      {"max_position_embeddings", s.max_position_embeddings},
      {"rms_norm_eps", 1e-6},
      {"rope_theta", 1000000.0},
      {"tie_word_embeddings", s.tie_word_embeddings},
      {"attention_bias", s.attention_bias},
      {"torch_dtype", "float32"},
  };
  if (s.latent_attention) {
    j["architectures"] = {"DeepseekV3ForCausalLM"};
    j["model_type"] = "deepseek_v3";
    j.erase("head_dim");
    j["num_key_value_heads"] = s.num_heads;
    j["q_lora_rank"] = 24;
    j["kv_lora_rank"] = 16;
    j["qk_nope_head_dim"] = s.head_dim;
    j["qk_rope_head_dim"] = 8;
    j["v_head_dim"] = s.head_dim;
    j["n_routed_experts"] = s.num_experts;
    j["num_experts_per_tok"] = s.experts_per_token;
    j["moe_intermediate_size"] = s.moe_intermediate_size;
    j["n_group"] = 1;
    j["topk_group"] = 1;
    j["n_shared_experts"] = 1;
    j["first_k_dense_replace"] = 1;
    j["routed_scaling_factor"] = 2.5;
    if (s.sparse_attention) {
      j["architectures"] = {"GlmMoeDsaForCausalLM"};
      j["model_type"] = "glm_moe_dsa";
      j["index_topk"] = 8;
      j["index_head_dim"] = 16;
      j["index_n_heads"] = 16;
      nlohmann::json types = nlohmann::json::array();
      for (int64_t i = 0; i < s.num_layers; ++i) types.push_back(i % 2 == 0 ? "full" : "shared");
      j["indexer_types"] = types;
    }
    return j;
  }
  if (s.moe) {
    j["num_experts"] = s.num_experts;
    j["num_experts_per_tok"] = s.experts_per_token;
    j["moe_intermediate_size"] = s.moe_intermediate_size;
    j["decoder_sparse_step"] = 1;
    j["mlp_only_layers"] = nlohmann::json::array();
    j["norm_topk_prob"] = true;
    j["output_router_logits"] = false;
  }
  return j;
}

// Makes up every tensor the model asks for, by name, as the model loads:
// norms 1, everything else ~ N(0, 0.02²); experts per expert, as the Hub
// stores them. The names and shapes come from the architecture's own files.
class RandomSource final : public TensorSource {
 public:
  explicit RandomSource(uint64_t seed) : gen_(at::make_generator<at::CPUGeneratorImpl>(seed)) {}

  absl::StatusOr<at::Tensor> Take(const std::string& name, std::vector<int64_t> shape,
                                  Slice slice) const override {
    auto [it, fresh] = made_.try_emplace(name);
    if (fresh) {
      it->second = absl::EndsWith(name, "norm.weight") ? at::ones(shape)
                                                        : at::empty(shape, at::kFloat).normal_(0.0, 0.02, gen_);
      order_.push_back(name);
    }
    const at::Tensor& t = it->second;
    return slice.dim < 0 ? t : t.narrow(slice.dim, slice.begin, slice.size).contiguous();
  }

  absl::StatusOr<Experts> TakeExperts(const std::string& mlp, int64_t experts, int64_t inter, int64_t hidden,
                                      int64_t first, int64_t count) const override {
    if (count < 0) count = experts - first;
    std::vector<at::Tensor> gate, up, down;
    for (int64_t e = 0; e < experts; ++e) {
      const std::string x = absl::StrCat(mlp, ".experts.", e, ".");
      LATHE_ASSIGN_OR_RETURN(at::Tensor g, Take(x + "gate_proj.weight", {inter, hidden}, {}));
      LATHE_ASSIGN_OR_RETURN(at::Tensor u, Take(x + "up_proj.weight", {inter, hidden}, {}));
      LATHE_ASSIGN_OR_RETURN(at::Tensor d, Take(x + "down_proj.weight", {hidden, inter}, {}));
      if (e >= first && e < first + count) gate.push_back(g), up.push_back(u), down.push_back(d);
    }
    return Experts{at::stack(gate), at::stack(up), at::stack(down)};
  }

  // Every tensor made, in the order the model asked for them.
  std::vector<TensorToWrite> Tensors() const {
    std::vector<TensorToWrite> out;
    for (const std::string& name : order_) {
      const at::Tensor& t = made_.at(name);
      out.push_back({name, "F32", t.sizes().vec(), t.data_ptr(), static_cast<size_t>(t.nbytes())});
    }
    return out;
  }

 private:
  mutable at::Generator gen_;
  mutable std::map<std::string, at::Tensor> made_;
  mutable std::vector<std::string> order_;
};

}  // namespace

absl::Status WriteTinyModel(const std::string& dir, const TinyModelSpec& s) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  const std::string config_text = ConfigJson(s).dump(2);
  LATHE_ASSIGN_OR_RETURN(ModelConfig config, ParseModelConfig(config_text));
  RandomSource source(s.seed);
  LoraSettings frozen;
  frozen.train_attn = frozen.train_mlp = frozen.train_unembed = false;
  LATHE_RETURN_IF_ERROR(DecoderModel::FromSource(config, source, frozen).status());
  LATHE_RETURN_IF_ERROR(WriteSafetensors(dir + "/model.safetensors", source.Tensors(), {{"format", "pt"}}));
  std::ofstream out(dir + "/config.json");
  out << config_text << "\n";
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", dir, "/config.json"));
  return absl::OkStatus();
}

}  // namespace lathe::runtime

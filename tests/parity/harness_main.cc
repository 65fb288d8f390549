// lathe_harness: runs a JSON list of training operations on the in-process
// Trainer and writes every output to a safetensors file, so the Python parity
// tests can compare lathe with transformers and peft.
//
//   lathe_harness --model DIR --request REQ.json --out OUT.safetensors
//
// Besides the training operations, "export_peft" writes the PEFT export
// (runtime/peft_export.h) of the current adapter.
//
// Exit 0 on success, 3 when an operation is refused (message on stderr), 1 on
// any other failure. See tests/parity/conftest.py for the request format.
#include <ATen/ATen.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "nlohmann/json.hpp"
#include "runtime/adamw.h"
#include "runtime/checkpoint.h"
#include "runtime/decoder_model.h"
#include "runtime/generate.h"
#include "runtime/peft_export.h"
#include "core/safetensors.h"
#include "core/status.h"
#include "runtime/trainer.h"
#include "runtime/weight_source.h"

namespace lathe::runtime {
namespace {

using nlohmann::json;

// JSON has no NaN or infinities: the strings "NaN", "Infinity", "-Infinity" stand for them.
double Number(const json& x) {
  if (x.is_string()) {
    const std::string s = x.get<std::string>();
    if (s == "NaN") return NAN;
    if (s == "Infinity") return INFINITY;
    if (s == "-Infinity") return -INFINITY;
  }
  return x.get<double>();
}

lathe::v1::TensorData WireFromJson(const std::string& key, const json& value) {
  lathe::v1::TensorData t;
  if (value.is_object()) {  // explicit {"dtype", "shape", "data"}
    std::string dtype = value.at("dtype");
    for (int64_t d : value.at("shape")) t.add_shape(d);
    if (dtype == "int64") {
      auto v = value.at("data").get<std::vector<int64_t>>();
      t.set_dtype(lathe::v1::INT64);
      t.set_data(v.data(), v.size() * 8);
    } else if (dtype == "int32") {
      auto v = value.at("data").get<std::vector<int32_t>>();
      t.set_dtype(lathe::v1::INT32);
      t.set_data(v.data(), v.size() * 4);
    } else {
      auto v = value.at("data").get<std::vector<float>>();
      t.set_dtype(lathe::v1::FLOAT32);
      t.set_data(v.data(), v.size() * 4);
    }
    return t;
  }
  bool two_d = value.is_array() && !value.empty() && value[0].is_array();
  t.add_shape(static_cast<int64_t>(value.size()));
  if (two_d) t.add_shape(static_cast<int64_t>(value[0].size()));
  std::vector<json> flat;
  for (const json& v : value) {
    if (two_d) {
      for (const json& x : v) flat.push_back(x);
    } else {
      flat.push_back(v);
    }
  }
  if (key == "target_tokens") {
    std::vector<int64_t> v;
    for (const json& x : flat) v.push_back(x.get<int64_t>());
    t.set_dtype(lathe::v1::INT64);
    t.set_data(v.data(), v.size() * 8);
  } else {
    std::vector<float> v;
    for (const json& x : flat) v.push_back(static_cast<float>(Number(x)));
    t.set_dtype(lathe::v1::FLOAT32);
    t.set_data(v.data(), v.size() * 4);
  }
  return t;
}

lathe::v1::ForwardBackwardInput BatchFromJson(const json& op) {
  lathe::v1::ForwardBackwardInput in;
  in.set_loss_fn(op.value("loss_fn", "cross_entropy"));
  if (op.contains("loss_fn_config")) {
    for (const auto& [k, v] : op.at("loss_fn_config").items()) {
      (*in.mutable_loss_fn_config())[k] = Number(v);
    }
  }
  for (const json& d : op.at("data")) {
    lathe::v1::Datum* datum = in.add_data();
    auto tokens = d.at("tokens").get<std::vector<int32_t>>();
    datum->mutable_model_input()->add_chunks()->mutable_encoded_text()->set_tokens(
        tokens.data(), tokens.size() * 4);
    if (d.contains("loss_fn_inputs")) {
      for (const auto& [k, v] : d.at("loss_fn_inputs").items()) {
        (*datum->mutable_loss_fn_inputs())[k] = WireFromJson(k, v);
      }
    }
  }
  return in;
}

// Collects tensors to write; owns contiguous fp32 copies.
struct Output {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::map<std::string, std::string> metadata;
  void Add(const std::string& name, const at::Tensor& t) {
    tensors.emplace_back(name, t.detach().to(at::kCPU, at::kFloat).contiguous().clone());
  }
  void AddWire(const std::string& name, const lathe::v1::TensorData& t) {
    std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
    at::Tensor v = at::from_blob(const_cast<char*>(t.data().data()), shape, at::kFloat);
    Add(name, v);
  }
  void DumpTrainable(const std::string& prefix, DecoderModel& model) {
    for (const TrainableParam& p : model.trainable()) {
      at::Tensor grad = p.tensor.grad().defined() ? p.tensor.grad() : at::zeros_like(p.tensor);
      ForEachNamed(p, p.tensor, [&](const std::string& n, const at::Tensor& t) { Add(prefix + ".param." + n, t); });
      ForEachNamed(p, grad, [&](const std::string& n, const at::Tensor& t) { Add(prefix + ".grad." + n, t); });
    }
  }
  absl::Status Write(const std::string& path) {
    std::vector<TensorToWrite> out;
    for (const auto& [name, t] : tensors) {
      out.push_back({name, "F32", t.sizes().vec(), t.data_ptr(), static_cast<size_t>(t.nbytes())});
    }
    return WriteSafetensors(path, out, metadata);
  }
};

absl::Status LoadAdapter(const std::string& path, DecoderModel& model) {
  LATHE_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
  std::map<std::string, at::Tensor> values;
  for (const std::string& name : file->names()) {
    LATHE_ASSIGN_OR_RETURN(TensorView view, file->Get(name));
    LATHE_ASSIGN_OR_RETURN(values[name], TensorFromView(view));
  }
  return model.SetTrainable(values);
}

LoraSettings LoraFromJson(const json& j) {
  LoraSettings s;
  if (j.is_null()) {
    s.rank = 0;
    return s;
  }
  s.rank = j.value("rank", 32);
  s.alpha = j.value("alpha", 32.0);
  s.seed = j.value("seed", 0);
  s.train_attn = j.value("train_attn", true);
  s.train_mlp = j.value("train_mlp", true);
  s.train_unembed = j.value("train_unembed", true);
  return s;
}

json MetricsJson(const google::protobuf::Map<std::string, double>& metrics) {
  json j = json::object();
  for (const auto& [k, v] : metrics) j[k] = v;
  return j;
}

int Run(const std::string& model_dir, const json& req, const std::string& out_path) {
  TrainerOptions options{model_dir, LoraFromJson(req.value("lora", json())), req.value("max_seq_len", 0),
                         req.value("micro_batch_tokens", 0)};
  options.logprob_chunk_tokens = req.value("logprob_chunk_tokens", 0);
  // "device": "cuda" runs on CUDA device 0 (tests/parity/test_gpu.py); default the CPU.
  options.device = req.value("device", std::string("cpu")) == "cuda" ? 0 : -1;
  // Float32 unless asked, on either device (the parity tests choose).
  absl::StatusOr<Dtype> dtype = ParseDtype(req.value("dtype", std::string()), /*on_gpu=*/false);
  if (!dtype.ok()) {
    std::fprintf(stderr, "%s\n", dtype.status().ToString().c_str());
    return 1;
  }
  options.dtype = *dtype;
  if (req.contains("recompute")) {
    absl::StatusOr<Recompute> recompute = ParseRecompute(req.at("recompute").get<std::string>());
    if (!recompute.ok()) {
      std::fprintf(stderr, "%s\n", recompute.status().ToString().c_str());
      return 1;
    }
    options.recompute = *recompute;
  }
  auto trainer = Trainer::Create(options);
  if (!trainer.ok()) {
    std::fprintf(stderr, "%s\n", trainer.status().ToString().c_str());
    return 1;
  }
  DecoderModel& model = (*trainer)->model();
  if (req.contains("adapter")) {
    if (auto s = LoadAdapter(req.at("adapter"), model); !s.ok()) {
      std::fprintf(stderr, "%s\n", s.ToString().c_str());
      return 1;
    }
  }
  Output out;
  out.DumpTrainable("init", model);
  const bool keep_going = req.value("continue_on_error", false);
  int refused = 0;
  int i = 0;
  for (const json& op : req.at("ops")) {
    const std::string kind = op.at("op");
    const std::string tag = "op" + std::to_string(i++);
    absl::Status status;
    if (kind == "forward" || kind == "forward_backward") {
      auto result = kind == "forward" ? (*trainer)->Forward(BatchFromJson(op))
                                      : (*trainer)->ForwardBackward(BatchFromJson(op));
      status = result.status();
      if (result.ok()) {
        for (int d = 0; d < result->loss_fn_outputs_size(); ++d) {
          for (const auto& [name, t] : result->loss_fn_outputs(d).tensors()) {
            out.AddWire(tag + ".datum" + std::to_string(d) + "." + name, t);
          }
        }
        out.metadata[tag + ".metrics"] = MetricsJson(result->metrics()).dump();
      }
    } else if (kind == "optim_step") {
      lathe::v1::AdamParams adam;
      const json a = op.value("adam", json::object());
      if (a.contains("learning_rate")) adam.set_learning_rate(a["learning_rate"]);
      if (a.contains("beta1")) adam.set_beta1(a["beta1"]);
      if (a.contains("beta2")) adam.set_beta2(a["beta2"]);
      if (a.contains("eps")) adam.set_eps(a["eps"]);
      if (a.contains("weight_decay")) adam.set_weight_decay(a["weight_decay"]);
      if (a.contains("grad_clip_norm")) adam.set_grad_clip_norm(a["grad_clip_norm"]);
      auto result = (*trainer)->OptimStep(adam);
      status = result.status();
      if (result.ok()) out.metadata[tag + ".metrics"] = MetricsJson(result->metrics()).dump();
    } else if (kind == "export_peft") {
      // {"dir": folder, "merged": bool, "ttl_seconds": n}: what save_weights_for_sampler writes.
      std::map<std::string, at::Tensor> params;
      for (const TrainableParam& p : model.trainable()) params[p.name] = p.tensor.detach();
      PeftExportOptions options;
      options.base_model = "lathe_harness";
      options.merge_base_dir = op.value("merged", false) ? model_dir : "";
      options.merged_bf16 = (*trainer)->GetInfo().dtype == Dtype::kBFloat16;
      options.ttl_seconds = op.value("ttl_seconds", int64_t{0});
      status = WritePeftAdapter(params, (*trainer)->GetInfo().lora, op.at("dir"), options);
    } else if (kind == "save_state") {
      // {"dir": folder}: SaveCheckpoint of this one process (parameters and optimizer).
      CheckpointMeta meta;
      meta.run_id = "lathe_harness";
      meta.name = op.at("dir").get<std::string>();
      status = SaveCheckpoint(**trainer, op.at("dir"), /*overwrite=*/false, meta, {}, nullptr, absl::Seconds(60));
    } else if (kind == "load_state") {
      // {"dir": folder, "optimizer": bool}: LoadCheckpoint; the step it resumes at in the metadata.
      auto step = LoadCheckpoint(**trainer, op.at("dir"), op.value("optimizer", true), nullptr, absl::Seconds(60));
      status = step.status();
      if (step.ok()) out.metadata[tag + ".step"] = std::to_string(*step);
    } else if (kind == "dump") {
      out.DumpTrainable(op.at("prefix"), model);
    } else if (kind == "generate") {
      // {"prompt": [...], "num_samples": n, "max_tokens", "temperature", "top_k", "top_p", "seed", "stop": [[...]]}
      SamplingSettings s;
      s.max_tokens = op.value("max_tokens", 16);
      s.temperature = op.value("temperature", 1.0);
      s.top_k = op.value("top_k", -1);
      s.top_p = op.value("top_p", 1.0);
      s.seed = op.value("seed", 0);
      if (op.contains("stop")) s.stop = op.at("stop").get<std::vector<std::vector<int32_t>>>();
      auto result = Generate(model, op.at("prompt").get<std::vector<int32_t>>(), op.value("num_samples", 1), s,
                             /*prompt_logprobs=*/true, 0);
      status = result.status();
      if (result.ok()) {
        out.Add(tag + ".prompt_logprobs", at::tensor(result->prompt_logprobs));
        for (size_t n = 0; n < result->sequences.size(); ++n) {
          const GeneratedSequence& seq = result->sequences[n];
          out.Add(tag + ".sample" + std::to_string(n) + ".tokens",
                  at::tensor(std::vector<float>(seq.tokens.begin(), seq.tokens.end())));
          out.Add(tag + ".sample" + std::to_string(n) + ".logprobs", at::tensor(seq.logprobs));
          out.metadata[tag + ".sample" + std::to_string(n) + ".stopped"] = seq.stopped ? "1" : "0";
        }
      }
    } else if (kind == "generate_batch") {
      // {"requests": [{"prompt", "num_samples", "max_tokens", "temperature", "top_k", "top_p", "seed",
      //   "topk_prompt_logprobs"}, ...]}: GenerateBatch, every request with prompt logprobs;
      // outputs <tag>.req<r>.* as "generate" does, plus .topk_ids / .topk_logprobs and
      // .batched_requests in the metadata.
      std::vector<SampleRequest> requests;
      for (const json& r : op.at("requests")) {
        SampleRequest q;
        q.prompt = r.at("prompt").get<std::vector<int32_t>>();
        q.num_samples = r.value("num_samples", 1);
        q.settings.max_tokens = r.value("max_tokens", 16);
        q.settings.temperature = r.value("temperature", 1.0);
        q.settings.top_k = r.value("top_k", -1);
        q.settings.top_p = r.value("top_p", 1.0);
        q.settings.seed = r.value("seed", 0);
        q.prompt_logprobs = true;
        q.topk_prompt_logprobs = r.value("topk_prompt_logprobs", int64_t{0});
        requests.push_back(std::move(q));
      }
      std::vector<absl::StatusOr<Generation>> results = GenerateBatch(model, requests, 0);
      for (size_t r = 0; r < results.size() && status.ok(); ++r) {
        const std::string req_tag = tag + ".req" + std::to_string(r);
        status = results[r].status();
        if (!status.ok()) break;
        const Generation& g = *results[r];
        out.Add(req_tag + ".prompt_logprobs", at::tensor(g.prompt_logprobs));
        if (!g.topk_ids.empty()) {
          out.Add(req_tag + ".topk_ids", at::tensor(std::vector<float>(g.topk_ids.begin(), g.topk_ids.end())));
          out.Add(req_tag + ".topk_logprobs", at::tensor(g.topk_logprobs));
        }
        out.metadata[req_tag + ".batched_requests"] = std::to_string(g.batched_requests);
        for (size_t n = 0; n < g.sequences.size(); ++n) {
          const GeneratedSequence& seq = g.sequences[n];
          out.Add(req_tag + ".sample" + std::to_string(n) + ".tokens",
                  at::tensor(std::vector<float>(seq.tokens.begin(), seq.tokens.end())));
          out.Add(req_tag + ".sample" + std::to_string(n) + ".logprobs", at::tensor(seq.logprobs));
        }
      }
    } else {
      status = absl::InvalidArgumentError("unknown op " + kind);
    }
    if (!status.ok()) {
      std::fprintf(stderr, "%s: %s\n", tag.c_str(), status.ToString().c_str());
      out.metadata[tag + ".error"] = status.ToString();
      ++refused;
      if (!keep_going) return 3;
    }
  }
  if (auto s = out.Write(out_path); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  return refused > 0 && !keep_going ? 3 : 0;
}

}  // namespace
}  // namespace lathe::runtime

int main(int argc, char** argv) {
  std::string model, request, out;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--model") model = argv[i + 1];
    if (flag == "--request") request = argv[i + 1];
    if (flag == "--out") out = argv[i + 1];
  }
  if (model.empty() || request.empty() || out.empty()) {
    std::fprintf(stderr, "usage: lathe_harness --model DIR --request REQ.json --out OUT.safetensors\n");
    return 1;
  }
  std::ifstream in(request);
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json req = nlohmann::json::parse(ss.str(), nullptr, false);
  if (req.is_discarded()) {
    std::fprintf(stderr, "cannot parse %s\n", request.c_str());
    return 1;
  }
  try {
    return lathe::runtime::Run(model, req, out);
  } catch (const nlohmann::json::exception& e) {
    std::fprintf(stderr, "bad request: %s\n", e.what());
    return 1;
  }
}

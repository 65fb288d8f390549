// lathe_gdn_harness: runs tensor/gated_delta_net.h on tensors from a safetensors file and
// writes the results to another, so tests/parity/test_gated_delta_net.py can compare them
// with transformers.
//
//   lathe_gdn_harness IN.safetensors OUT.safetensors
//
// IN holds F32 tensors qkv, z, b, a, conv_weight, a_log, dt_bias, norm_weight (and
// grad_out for "forward_backward") and metadata: "dims" (JSON object of GdnDims' fields),
// "lengths" (JSON list), "mode":
//   forward_backward  one packed pass; writes out, and grad.<input> for every input
//                     tensor, the gradients of sum(out * grad_out).
//   decode            each sequence is fed its first "prefill"[s] tokens in one call, then
//                     its other tokens one per call (all sequences together); writes out
//                     (rows in packed order), state.conv.<s> and state.recurrent.<s>.
// A "float64" or "bfloat16" metadata key runs in that dtype (outputs are written as F32).
// Exit 0 on success, 1 on any failure (message on stderr).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "tensor/gated_delta_net.h"
#include "core/safetensors.h"
#include "core/status.h"

namespace lathe::runtime {
namespace {

using nlohmann::json;

const char* const kInputs[] = {"qkv", "z", "b", "a", "conv_weight", "a_log", "dt_bias", "norm_weight"};

absl::StatusOr<std::map<std::string, at::Tensor>> ReadTensors(const SafetensorsFile& file) {
  std::map<std::string, at::Tensor> out;
  for (const std::string& name : file.names()) {
    LATHE_ASSIGN_OR_RETURN(TensorView v, file.Get(name));
    if (v.dtype != "F32") return absl::InvalidArgumentError("tensor " + name + " is " + v.dtype + ", not F32");
    out[name] = at::from_blob(const_cast<uint8_t*>(v.data), v.shape, at::kFloat).clone();
  }
  return out;
}

GdnDims DimsFrom(const json& j) {
  GdnDims d;
  d.num_k_heads = j.at("num_k_heads");
  d.num_v_heads = j.at("num_v_heads");
  d.head_k_dim = j.at("head_k_dim");
  d.head_v_dim = j.at("head_v_dim");
  d.conv_kernel = j.at("conv_kernel");
  d.norm_eps = j.at("norm_eps");
  if (j.contains("chunk_size")) d.chunk_size = j.at("chunk_size");
  return d;
}

GdnInputs Rows(const std::map<std::string, at::Tensor>& t, const at::Tensor& index) {
  return {t.at("qkv").index_select(0, index), t.at("z").index_select(0, index), t.at("b").index_select(0, index),
          t.at("a").index_select(0, index)};
}

// Prefill then single steps; returns the output rows in packed order.
at::Tensor Decode(const GdnDims& dims, const GdnWeights& w, const std::map<std::string, at::Tensor>& t,
                  const std::vector<int64_t>& lengths, const std::vector<int64_t>& prefill,
                  std::vector<GdnState>* states) {
  at::NoGradGuard no_grad;
  const int64_t n = static_cast<int64_t>(lengths.size());
  std::vector<int64_t> start(n, 0);
  for (int64_t s = 1; s < n; ++s) start[s] = start[s - 1] + lengths[s - 1];
  at::Tensor out = at::zeros({t.at("qkv").size(0), dims.value_dim()});
  std::vector<int64_t> fed(n, 0);
  for (int64_t s = 0; s < n; ++s) states->push_back(GdnInitialState(dims, t.at("qkv")));
  for (bool first = true;; first = false) {
    std::vector<int64_t> seqs, rows, step_lengths;
    for (int64_t s = 0; s < n; ++s) {
      const int64_t take = std::min(first ? prefill[s] : 1, lengths[s] - fed[s]);
      if (take <= 0) continue;
      seqs.push_back(s);
      step_lengths.push_back(take);
      for (int64_t p = 0; p < take; ++p) rows.push_back(start[s] + fed[s] + p);
      fed[s] += take;
    }
    if (seqs.empty()) break;
    std::vector<GdnState> step_states;
    for (int64_t s : seqs) step_states.push_back((*states)[s]);
    const at::Tensor index = at::tensor(rows, at::kLong);
    out.index_copy_(0, index, GatedDeltaNet(dims, w, Rows(t, index), step_lengths, &step_states));
    for (size_t i = 0; i < seqs.size(); ++i) (*states)[seqs[i]] = step_states[i];
  }
  return out;
}

absl::Status Run(const std::string& in_path, const std::string& out_path) {
  LATHE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(in_path));
  LATHE_ASSIGN_OR_RETURN(auto t, ReadTensors(*file));
  const auto& meta = file->metadata();
  const GdnDims dims = DimsFrom(json::parse(meta.at("dims")));
  const auto lengths = json::parse(meta.at("lengths")).get<std::vector<int64_t>>();
  const std::string mode = meta.at("mode");
  if (meta.count("float64") != 0) {  // for measuring rounding against an fp64 run
    for (auto& [name, tensor] : t) tensor = tensor.to(at::kDouble);
  }
  if (meta.count("bfloat16") != 0) {  // bf16 values stored as F32 (exactly)
    for (auto& [name, tensor] : t) tensor = tensor.to(at::kBFloat16);
  }
  std::map<std::string, at::Tensor> results;
  if (mode == "forward_backward") {
    for (const char* name : kInputs) t[name].requires_grad_(true);
    const GdnWeights w{t["conv_weight"], t["a_log"], t["dt_bias"], t["norm_weight"]};
    const at::Tensor out = GatedDeltaNet(dims, w, {t["qkv"], t["z"], t["b"], t["a"]}, lengths);
    (out * t.at("grad_out")).sum().backward();
    results["out"] = out.detach();
    for (const char* name : kInputs) results[std::string("grad.") + name] = t[name].grad();
  } else if (mode == "decode") {
    const GdnWeights w{t["conv_weight"], t["a_log"], t["dt_bias"], t["norm_weight"]};
    const auto prefill = json::parse(meta.at("prefill")).get<std::vector<int64_t>>();
    std::vector<GdnState> states;
    results["out"] = Decode(dims, w, t, lengths, prefill, &states);
    for (size_t s = 0; s < states.size(); ++s) {
      results["state.conv." + std::to_string(s)] = states[s].conv;
      results["state.recurrent." + std::to_string(s)] = states[s].recurrent;
    }
  } else {
    return absl::InvalidArgumentError("unknown mode '" + mode + "'");
  }
  std::vector<TensorToWrite> write;
  for (auto& [name, tensor] : results) {
    tensor = tensor.to(at::kFloat).contiguous();
    write.push_back({name, "F32", tensor.sizes().vec(), tensor.data_ptr(), static_cast<size_t>(tensor.nbytes())});
  }
  return WriteSafetensors(out_path, write);
}

}  // namespace
}  // namespace lathe::runtime

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN.safetensors OUT.safetensors\n", argv[0]);
    return 1;
  }
  try {
    const absl::Status s = lathe::runtime::Run(argv[1], argv[2]);
    if (!s.ok()) {
      std::fprintf(stderr, "lathe_gdn_harness: %s\n", s.ToString().c_str());
      return 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lathe_gdn_harness: %s\n", e.what());
    return 1;
  }
  return 0;
}

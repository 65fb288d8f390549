// Under mpirun: a sharded run (replicas × node group, tp, cp, ep) of tiny
// Qwen3 and Qwen3-MoE models against the single-process runtime, computed on
// every rank. LoRA and full fine-tuning; forward, forward_backward with
// several losses (gspo's per-datum sequence ratio included) and batches that
// leave data shards empty, four clipped optim_steps; with cp a fifth step on
// a long sequence packed with short ones (some shorter than 2·cp).
// Checks per-datum logprobs (abs), losses and grad norms (rel), every
// parameter shard against the matching slice of the reference after each
// step, and the adapter's initial values. All ranks agree on the verdict.
//
// With --bf16 1 both run under bfloat16 and the tolerances are bf16's
// (docs/runtime.md, "Precision"): the shards round partial products where the
// single process rounds whole ones.
//
// Usage: mpirun -np W parallel_parity_mpi [--replicas R] [--node_count N] [--tp T] [--cp C] [--ep E]
//        [--long L] (the length of the long sequence with cp; default 1536) [--bf16 1]
//        [--tol_scale S] (every tolerance times S; the Qwen3.5 hybrids' tolerances, docs/parallel.md)
//        [--control N] (with -np 1: the second trainer is one process packing N-token micro-batches)
// (devices per node = W / (R · N)).
#include <mpi.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <unistd.h>

#include "parallel/context.h"
#include "runtime/decoder_model.h"
#include "runtime/parallel_setup.h"
#include "runtime/tensor_data.h"
#include "runtime/tiny_model.h"
#include "runtime/trainer.h"
#include "tests/runtime/wire_datum.h"

namespace lathe {
namespace {

using runtime::Wire;

using runtime::TrainableParam;

int world_rank = 0;
int failures = 0;
double worst_lp = 0, worst_loss = 0, worst_param = 0;

// Tolerances: fp32's, or bf16's under --bf16.
struct Tolerance {
  double logprob = 1e-5, loss = 1e-5, grad_norm = 1e-5, param = 1e-5;
};
Tolerance tol;

void Expect(bool ok, const std::string& what) {
  if (!ok) {
    if (failures < 20) std::fprintf(stderr, "rank %d: FAILED %s\n", world_rank, what.c_str());
    ++failures;
  }
}

double Rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-6); }

// Datums with tokens drawn from a fixed formula; `kind` picks the loss inputs.
// "cross_entropy_2d": cross_entropy whose first datum has two targets per
// token ([N, 2] targets and weights), so the batch cannot be packed flat.
lathe::v1::ForwardBackwardInput Batch(const std::vector<int>& lengths, const std::string& kind, int64_t vocab,
                                      int salt) {
  lathe::v1::ForwardBackwardInput in;
  const bool two_d = kind == "cross_entropy_2d";
  const std::string loss = two_d ? "cross_entropy" : kind;
  in.set_loss_fn(loss);
  for (size_t d = 0; d < lengths.size(); ++d) {
    std::vector<int32_t> tokens;
    std::vector<int64_t> targets;
    std::vector<float> weights, q, adv, ratio_mask;
    for (int i = 0; i < lengths[d]; ++i) {
      tokens.push_back(static_cast<int32_t>((d * 131 + i * 17 + salt * 7) % vocab));
      targets.push_back(i == 1 ? -100 : static_cast<int64_t>((d * 29 + i * 53 + salt) % vocab));
      weights.push_back(i % 3 == 2 ? -0.5f : 1.0f);
      q.push_back(-4.0f - 0.1f * static_cast<float>(i % 5));
      // Mostly positive, so the summed loss does not cancel to near zero
      // (a relative check of a cancelled sum measures nothing).
      const int k = (static_cast<int>(d) + i) % 3;
      adv.push_back(k == 0 ? -0.5f : static_cast<float>(k));
      ratio_mask.push_back(i % 4 == 3 ? 0.0f : 1.0f);  // marks the ignored target 1 too
    }
    lathe::v1::Datum* datum = in.add_data();
    datum->mutable_model_input()->add_chunks()->mutable_encoded_text()->set_tokens(tokens.data(), tokens.size() * 4);
    auto& inputs = *datum->mutable_loss_fn_inputs();
    inputs["target_tokens"] = Wire(targets, lathe::v1::INT64);
    if (two_d && d == 0) {
      std::vector<int64_t> pairs;
      std::vector<float> pair_weights;
      for (int i = 0; i < lengths[d]; ++i) {
        pairs.insert(pairs.end(), {(i * 53 + salt) % vocab, (i * 31 + 5) % vocab});
        pair_weights.insert(pair_weights.end(), {1.0f, 0.25f});
      }
      inputs["target_tokens"] = Wire(pairs, lathe::v1::INT64);
      inputs["target_tokens"].set_shape(0, lengths[d]);
      inputs["target_tokens"].add_shape(2);
      inputs["weights"] = Wire(pair_weights, lathe::v1::FLOAT32);
      inputs["weights"].set_shape(0, lengths[d]);
      inputs["weights"].add_shape(2);
    } else if (loss == "cross_entropy") {
      inputs["weights"] = Wire(weights, lathe::v1::FLOAT32);
    } else {
      inputs["logprobs"] = Wire(q, lathe::v1::FLOAT32);
      inputs["advantages"] = Wire(adv, lathe::v1::FLOAT32);
      if (loss == "gspo") inputs["sequence_ratio_mask"] = Wire(ratio_mask, lathe::v1::FLOAT32);
    }
  }
  return in;
}

at::Tensor SliceOf(const at::Tensor& full, const TrainableParam& p) {
  return p.shard_dim < 0 ? full : full.narrow(p.shard_dim, p.shard_begin, p.tensor.size(p.shard_dim));
}

std::map<std::string, const TrainableParam*> ByName(const std::vector<TrainableParam>& ps) {
  std::map<std::string, const TrainableParam*> m;
  for (const TrainableParam& p : ps) m[p.name] = &p;
  return m;
}

void CompareParams(runtime::Trainer& ref, runtime::Trainer& par, const std::string& when, double tol) {
  auto full = ByName(ref.model().trainable());
  Expect(full.size() == par.model().trainable().size(), when + ": same trainable tensors");
  for (const TrainableParam& p : par.model().trainable()) {
    auto it = full.find(p.name);
    if (it == full.end()) {
      Expect(false, when + ": reference lacks " + p.name);
      continue;
    }
    at::Tensor want = SliceOf(it->second->tensor.detach(), p);
    at::Tensor got = p.tensor.detach();
    if (want.sizes() != got.sizes()) {
      Expect(false, when + ": shape of " + p.name);
      continue;
    }
    double scale = std::max(want.abs().max().item<double>(), 1e-6);
    double err = (want - got).abs().max().item<double>() / scale;
    if (err > worst_param && std::getenv("LATHE_PARITY_VERBOSE") != nullptr) {
      std::fprintf(stderr, "rank %d: %s %s rel err %.2e\n", world_rank, when.c_str(), p.name.c_str(), err);
    }
    worst_param = std::max(worst_param, err);
    Expect(err <= tol, when + ": " + p.name + " rel err " + std::to_string(err));
  }
}

void CompareOutputs(const lathe::v1::ForwardBackwardOutput& a, const lathe::v1::ForwardBackwardOutput& b,
                    const std::string& when) {
  Expect(a.loss_fn_outputs_size() == b.loss_fn_outputs_size(), when + ": datum count");
  for (int i = 0; i < std::min(a.loss_fn_outputs_size(), b.loss_fn_outputs_size()); ++i) {
    at::Tensor x = runtime::TensorFromWire(a.loss_fn_outputs(i).tensors().at("logprobs"));
    at::Tensor y = runtime::TensorFromWire(b.loss_fn_outputs(i).tensors().at("logprobs"));
    if (x.sizes() != y.sizes()) {
      Expect(false, when + ": logprobs shape of datum " + std::to_string(i));
      continue;
    }
    double err = (x - y).abs().max().item<double>();
    worst_lp = std::max(worst_lp, err);
    Expect(err <= tol.logprob, when + ": logprobs of datum " + std::to_string(i) + " abs err " + std::to_string(err));
  }
  double la = a.metrics().at("loss:sum"), lb = b.metrics().at("loss:sum");
  if (Rel(lb, la) > worst_loss && std::getenv("LATHE_PARITY_VERBOSE") != nullptr) {
    std::fprintf(stderr, "rank %d: %s loss %.9g vs %.9g rel err %.2e\n", world_rank, when.c_str(), la, lb, Rel(lb, la));
  }
  worst_loss = std::max(worst_loss, Rel(lb, la));
  Expect(Rel(lb, la) <= tol.loss, when + ": loss " + std::to_string(la) + " vs " + std::to_string(lb));
  Expect(a.metrics().at("num_tokens:sum") == b.metrics().at("num_tokens:sum"), when + ": token count");
  for (const char* moe : {"moe_frac_experts_with_tokens:mean", "moe_max_over_mean_load:max"}) {
    Expect(a.metrics().count(moe) == b.metrics().count(moe), when + ": metric " + moe);
    if (b.metrics().count(moe) != 0) {
      double v = b.metrics().at(moe);
      Expect(v > 0 && std::isfinite(v), when + ": " + moe + " = " + std::to_string(v));
    }
  }
}

// The sharded trainer's memory options (the reference keeps the defaults).
struct MemoryOptions {
  int64_t logprob_chunk_tokens = 0;
  bool recompute = false;
  int long_tokens = 1536;
  runtime::Dtype dtype = runtime::Dtype::kFloat32;  // both trainers'
  bool attention_bias = false;  // the model has q/k/v/o biases
  // --control N: the second trainer is not sharded but another single process
  // that packs each call into micro-batches of N tokens (the reference: 16),
  // with the cp steps' long sequence: how far summation order alone moves the
  // same run, the noise floor the sharded differences are measured against.
  int64_t control_micro_batch_tokens = 0;
};

// `given`: a model folder to use instead of the tiny model written here.
void Run(const parallel::MeshShape& shape, bool moe, bool full_ft, const std::string& dir,
         const MemoryOptions& memory, const std::string& given = "") {
  const std::string label = (given.empty() ? std::string(moe ? "moe" : "dense") : given) + (full_ft ? "/full" : "/lora");
  runtime::TinyModelSpec spec;
  spec.moe = moe;
  spec.vocab_size = 251;  // split unevenly over tp
  spec.hidden_size = 64;
  spec.num_heads = 4;
  spec.num_kv_heads = 2;
  spec.head_dim = 16;
  spec.num_experts = 8;
  spec.experts_per_token = 2;
  spec.seed = 7;
  spec.attention_bias = memory.attention_bias;
  const std::string model = given.empty() ? dir + (moe ? "/moe" : "/dense") : given;
  if (given.empty()) {
    if (auto s = runtime::WriteTinyModel(model, spec); !s.ok()) {
      Expect(false, "writing the model: " + std::string(s.message()));
      return;
    }
  } else if (auto config = runtime::LoadModelConfig(model); config.ok()) {
    spec.vocab_size = config->vocab_size;
  } else {
    Expect(false, "reading the model: " + std::string(config.status().message()));
    return;
  }
  runtime::LoraSettings lora;
  lora.rank = full_ft ? 0 : 4;
  lora.alpha = 8;
  lora.train_unembed = true;
  const bool control = memory.control_micro_batch_tokens > 0;
  const bool long_steps = shape.cp > 1 || control;
  runtime::TrainerOptions options{model, lora, long_steps ? memory.long_tokens : 64, 16};
  options.dtype = memory.dtype;
  auto ref = runtime::Trainer::Create(options);
  auto ctx = runtime::MakeModelContext(model, shape.replicas, shape.node_count, shape.tp, shape.ep, absl::Seconds(60),
                                       shape.cp);
  if (!ref.ok() || !ctx.ok()) {
    Expect(false, label + ": setup " + (ref.ok() ? std::string(ctx.status().message()) : std::string(ref.status().message())));
    return;
  }
  options.parallel = control ? nullptr : ctx->get();
  if (control) options.micro_batch_tokens = memory.control_micro_batch_tokens;
  options.logprob_chunk_tokens = memory.logprob_chunk_tokens;
  if (memory.recompute) options.recompute = runtime::Recompute::kOn;
  auto par = runtime::Trainer::Create(options);
  if (!par.ok()) {
    Expect(false, label + ": sharded load: " + std::string(par.status().message()));
    return;
  }
  CompareParams(**ref, **par, label + " initial adapter", 0.0);
  // Same non-zero starting point in both, so every tensor gets a gradient.
  {
    at::NoGradGuard no_grad;
    at::manual_seed(3);
    auto full = ByName((*ref)->model().trainable());
    for (TrainableParam& p : (*ref)->model().trainable()) {
      if (p.name.find("lora_B") != std::string::npos) p.tensor.normal_(0.0, 0.05);
    }
    for (TrainableParam& p : (*par)->model().trainable()) p.tensor.copy_(SliceOf(full.at(p.name)->tensor, p));
  }
  const int64_t vocab = spec.vocab_size;
  auto fwd_a = (*ref)->Forward(Batch({7, 12, 3}, "cross_entropy", vocab, 1));
  auto fwd_b = (*par)->Forward(Batch({7, 12, 3}, "cross_entropy", vocab, 1));
  Expect(fwd_a.ok() && fwd_b.ok(), label + ": forward ran");
  if (fwd_a.ok() && fwd_b.ok()) CompareOutputs(*fwd_a, *fwd_b, label + " forward");
  std::vector<std::pair<std::vector<int>, std::string>> steps = {
      {{7, 12, 3, 9, 5, 1, 20}, "cross_entropy"},
      {{11, 4, 6}, "importance_sampling"},
      {{13}, "ppo"},
      {{6, 10}, "gspo"}};
  // One long sequence (its own micro-batch) and short ones packed together.
  if (long_steps) steps.push_back({{memory.long_tokens, 5, 2, 1, 3, 7}, "cross_entropy"});
  // Two targets per token in one datum: logprobs gathered per datum.
  if (long_steps) steps.push_back({{9, 3, 14, 1}, "cross_entropy_2d"});
  for (size_t step = 0; step < steps.size(); ++step) {
    const std::string when = label + " step " + std::to_string(step);
    auto in = Batch(steps[step].first, steps[step].second, vocab, static_cast<int>(step));
    auto a = (*ref)->ForwardBackward(in);
    auto b = (*par)->ForwardBackward(in);
    Expect(a.ok() && b.ok(), when + ": forward_backward ran " + (b.ok() ? "" : std::string(b.status().message())));
    if (!a.ok() || !b.ok()) return;
    CompareOutputs(*a, *b, when);
    lathe::v1::AdamParams adam;
    // AdamW moves an element by about lr whatever its gradient's size, so
    // elements whose gradient is at float noise level differ by up to ~lr
    // between summation orders: learning rates of real runs (the API default
    // 1e-4 for full fine-tuning, 1e-3 for LoRA) keep that under the tolerance.
    adam.set_learning_rate(full_ft ? 1e-4 : 1e-3);
    adam.set_weight_decay(0.01);
    adam.set_grad_clip_norm(0.5);
    auto sa = (*ref)->OptimStep(adam);
    auto sb = (*par)->OptimStep(adam);
    Expect(sa.ok() && sb.ok(), when + ": optim_step ran");
    if (!sa.ok() || !sb.ok()) return;
    double na = sa->metrics().at("grad_norm:mean"), nb = sb->metrics().at("grad_norm:mean");
    Expect(Rel(nb, na) <= tol.grad_norm, when + ": grad norm " + std::to_string(na) + " vs " + std::to_string(nb));
    CompareParams(**ref, **par, when, tol.param);
  }
}

}  // namespace
}  // namespace lathe

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &lathe::world_rank);
  at::set_num_threads(1);
  lathe::parallel::MeshShape shape;
  lathe::MemoryOptions memory;
  std::string given_model;  // --model DIR: that model instead of the tiny ones
  double tol_scale = 1;      // --tol_scale S: every tolerance times S (docs/parallel.md)
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const int value = std::atoi(argv[i + 1]);
    if (flag == "--model") given_model = argv[i + 1];
    else if (flag == "--replicas") shape.replicas = value;
    else if (flag == "--node_count") shape.node_count = value;
    else if (flag == "--tp") shape.tp = value;
    else if (flag == "--ep") shape.ep = value;
    else if (flag == "--cp") shape.cp = value;
    else if (flag == "--long") memory.long_tokens = value;
    else if (flag == "--logprob_chunk_tokens") memory.logprob_chunk_tokens = value;
    else if (flag == "--recompute") memory.recompute = value != 0;
    else if (flag == "--attention_bias") memory.attention_bias = value != 0;
    else if (flag == "--control") memory.control_micro_batch_tokens = value;
    else if (flag == "--tol_scale") {
      char* end = nullptr;
      tol_scale = std::strtod(argv[i + 1], &end);
      if (end == argv[i + 1] || *end != '\0' || !(tol_scale >= 1)) {
        if (lathe::world_rank == 0) std::fprintf(stderr, "--tol_scale '%s': want a number >= 1\n", argv[i + 1]);
        MPI_Finalize();
        return 2;
      }
    }
    else if (flag == "--bf16" && value != 0) memory.dtype = lathe::runtime::Dtype::kBFloat16;
  }
  int world_size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--control") != 0) continue;
    if (memory.control_micro_batch_tokens <= 0 || world_size != 1) {
      if (lathe::world_rank == 0) {
        std::fprintf(stderr, "--control '%s': want a token count > 0 under mpirun -np 1 (got -np %d)\n", argv[i + 1],
                     world_size);
      }
      MPI_Finalize();
      return 2;
    }
  }
  if (memory.dtype == lathe::runtime::Dtype::kBFloat16) {
    // The bf16 parity tolerances (loss, gradients); a parameter may move by
    // up to ~2·lr per step more or less where bf16 noise flips the sign of a
    // tiny gradient: 4 steps at lr 1e-3 against weights of ~0.1. Logprobs
    // are compared after those steps (the two runs' weights then differ
    // within that bound) and, with cp, over a 1,536-token sequence whose
    // attention is merged from two bf16 flash outputs: twice the single-step
    // bound of 0.05 (measured 0.055 with cp 2, 5e-3 with tp/ep).
    lathe::tol = {0.1, 0.01, 0.05, 0.1};
  }
  lathe::tol = {lathe::tol.logprob * tol_scale, lathe::tol.loss * tol_scale, lathe::tol.grad_norm * tol_scale,
                lathe::tol.param * tol_scale};
  char tmpl[] = "/tmp/lathe_parity_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  if (!given_model.empty()) {
    for (bool full_ft : {false, true}) lathe::Run(shape, false, full_ft, dir, memory, given_model);
  } else {
    for (bool moe : {false, true}) {
      if (!moe && shape.ep > 1) continue;  // expert parallelism needs experts
      // The biases add one offset to every token, so this tiny MoE routes no
      // token to some experts: their router rows get float-noise gradients,
      // which AdamW turns into lr-sized steps of either sign. The dense model
      // exercises the biases' cuts and reduction alone.
      if (moe && memory.attention_bias) continue;
      for (bool full_ft : {false, true}) lathe::Run(shape, moe, full_ft, dir, memory);
    }
  }
  std::system(("rm -rf " + dir).c_str());
  int total = 0;
  MPI_Allreduce(&lathe::failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  double worst[3] = {lathe::worst_lp, lathe::worst_loss, lathe::worst_param}, all[3];
  MPI_Allreduce(worst, all, 3, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  if (lathe::world_rank == 0) {
    std::printf("%s: %d failures; worst logprob abs %.2e, loss rel %.2e, param rel %.2e\n",
                total == 0 ? "PASS" : "FAIL", total, all[0], all[1], all[2]);
  }
  MPI_Finalize();
  return total == 0 ? 0 : 1;
}

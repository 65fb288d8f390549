// Prefill + batched decode over per-sample KV caches.
#include "runtime/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <optional>

#include "absl/strings/str_cat.h"
#include "parallel/model_parallel.h"
#include "runtime/decoder_model.h"
#include "runtime/device.h"
#include "tensor/layers.h"

namespace lathe::runtime {
namespace {

absl::Status Check(const DecoderModel& model, const SampleRequest& r, int64_t max_seq_len) {
  if (r.prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  if (r.num_samples < 1) {
    return absl::InvalidArgumentError(absl::StrCat("num_samples must be >= 1 (got ", r.num_samples, ")"));
  }
  for (size_t i = 0; i < r.prompt.size(); ++i) {
    if (r.prompt[i] < 0 || r.prompt[i] >= model.config().vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token ", i, " is ", r.prompt[i],
                                                     ", outside the vocabulary [0, ", model.config().vocab_size, ")"));
    }
  }
  if (absl::Status st = ValidateSamplingSettings(r.settings); !st.ok()) return st;
  if (max_seq_len > 0 && static_cast<int64_t>(r.prompt.size()) + r.settings.max_tokens > max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat("prompt (", r.prompt.size(), ") + max_tokens (",
                                                   r.settings.max_tokens, ") exceeds max_seq_len ", max_seq_len));
  }
  if (r.topk_prompt_logprobs < 0 || r.topk_prompt_logprobs > model.config().vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("topk_prompt_logprobs must be in [0, vocab_size] (got ", r.topk_prompt_logprobs, ")"));
  }
  return absl::OkStatus();
}

// The whole vocabulary's logits [N, V] of hidden rows (gathered over tp).
at::Tensor FullLogits(const DecoderModel& model, const at::Tensor& hidden) {
  at::Tensor logits = model.Logits(hidden).to(at::kFloat);
  const parallel::Group& tp = model.shard().tp;
  if (!tp.active()) return logits;
  return parallel::GatherRows(logits.t().contiguous(), model.config().vocab_size, tp).t();
}

uint64_t Mix(uint64_t x) {  // splitmix64
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The next token from one logits row; nullopt when the row, divided by the
// temperature, is not finite (no distribution to draw from).
std::optional<int32_t> Draw(const at::Tensor& logits, const SamplingSettings& s, at::Generator& gen) {
  at::Tensor scaled = s.temperature == 0 ? logits : logits / s.temperature;
  // NaN and +inf propagate into the maximum; all -inf leaves nothing to draw.
  if (!std::isfinite(scaled.max().item<float>())) return std::nullopt;
  if (s.temperature == 0) return static_cast<int32_t>(logits.argmax().item<int64_t>());
  if (s.top_k > 0 && s.top_k < scaled.size(0)) {
    const double kth = std::get<0>(at::topk(scaled, s.top_k)).min().item<double>();
    scaled = scaled.masked_fill(scaled < kth, -std::numeric_limits<double>::infinity());
  }
  if (s.top_p < 1) {
    auto [sorted, order] = at::sort(scaled, /*dim=*/0, /*descending=*/true);
    at::Tensor cum = at::softmax(sorted, 0).cumsum(0);
    // Keep the smallest prefix whose mass reaches top_p (the first token always).
    at::Tensor drop = (cum - at::softmax(sorted, 0)) >= s.top_p;
    scaled = scaled.index_fill(0, order.masked_select(drop), -std::numeric_limits<double>::infinity());
  }
  return static_cast<int32_t>(at::multinomial(at::softmax(scaled, 0), 1, false, gen).item<int64_t>());
}

absl::Status NotDrawable(const SamplingSettings& s) {
  return absl::InvalidArgumentError(absl::StrCat(
      "the next-token distribution is not finite in float32 at temperature ", s.temperature,
      " (logits / temperature overflow, or the weights give non-finite logits); use temperature 0 for greedy "
      "decoding"));
}

// Generation::prompt_logprobs from the prompt's hidden rows.
std::vector<float> OfPrompt(const DecoderModel& model, const at::Tensor& hidden, const at::Tensor& ids) {
  const int64_t p = ids.size(0);
  std::vector<float> out(1, std::numeric_limits<float>::quiet_NaN());
  if (p > 1) {
    at::Tensor lp = model.Logprobs(model.Logits(hidden.narrow(0, 0, p - 1)), ids.narrow(0, 1, p - 1));
    at::Tensor c = lp.to(at::kCPU, at::kFloat).contiguous();
    out.insert(out.end(), c.data_ptr<float>(), c.data_ptr<float>() + p - 1);
  }
  return out;
}

bool EndsWithStop(const std::vector<int32_t>& tokens, const SamplingSettings& s) {
  for (const auto& stop : s.stop) {
    if (tokens.size() >= stop.size() && std::equal(stop.rbegin(), stop.rend(), tokens.rbegin())) return true;
  }
  return false;
}


// One sequence being decoded.
struct Decoding {
  size_t request;
  GeneratedSequence* out;
  at::Generator gen;
  SequenceState cache;
};

// Prefills r's prompt: fills `out`'s prompt logprobs and returns the cache
// and the last prompt token's hidden row [1, H].
std::pair<SequenceState, at::Tensor> Prefill(const DecoderModel& model, const SampleRequest& r, Generation& out) {
  std::vector<SequenceState> prefill(1);
  const int64_t p = static_cast<int64_t>(r.prompt.size());
  at::Tensor ids = OnDevice(at::tensor(std::vector<int64_t>(r.prompt.begin(), r.prompt.end()), at::kLong),
                            model.device());
  at::Tensor hidden = model.Hidden(ids, {p}, nullptr, &prefill);
  if (r.prompt_logprobs) out.prompt_logprobs = OfPrompt(model, hidden, ids);
  const int64_t topk = r.topk_prompt_logprobs;
  if (topk > 0) {
    out.topk_ids.assign(topk, 0);
    out.topk_logprobs.assign(topk, -99999.0f);
    if (p > 1) {
      auto [values, indices] = at::topk(at::log_softmax(FullLogits(model, hidden.narrow(0, 0, p - 1)), -1), topk);
      at::Tensor v = values.cpu().contiguous(), i = indices.to(at::kCPU, at::kInt).contiguous();
      out.topk_logprobs.insert(out.topk_logprobs.end(), v.data_ptr<float>(), v.data_ptr<float>() + v.numel());
      out.topk_ids.insert(out.topk_ids.end(), i.data_ptr<int32_t>(), i.data_ptr<int32_t>() + i.numel());
    }
  }
  return {std::move(prefill[0]), hidden.narrow(0, p - 1, 1)};
}

// The state of one Decode: requests, their results and the sequences still
// decoding (with the logits row each draws its next token from).
class Decoder {
 public:
  Decoder(const DecoderModel& model, int64_t max_seq_len, const DecodeHooks& hooks)
      : model_(model), max_seq_len_(max_seq_len), hooks_(hooks) {}

  void Run(std::vector<SampleRequest> requests) {
    Admit(std::move(requests));
    while (!active_.empty()) {
      Step();
      std::vector<SampleRequest> joining;
      if (hooks_.join) joining = hooks_.join(static_cast<int>(active_.size()));
      Admit(std::move(joining));
    }
  }

 private:
  struct Request {
    SampleRequest spec;
    absl::StatusOr<Generation> result;
    int decoding = 0;  // its sequences still decoding
    bool finished = false;  // answered
  };

  // Prefills each new request alone (BLAS), then computes their first
  // logits rows in one batch-invariant product and appends their sequences.
  void Admit(std::vector<SampleRequest> requests) {
    std::vector<at::Tensor> rows;
    std::vector<int64_t> row_of;
    for (SampleRequest& spec : requests) {
      const size_t k = requests_.size();
      absl::Status st = Check(model_, spec, max_seq_len_);
      requests_.push_back({std::move(spec), st.ok() ? absl::StatusOr<Generation>(Generation{}) : st, 0});
      Request& r = requests_.back();
      if (!st.ok()) {
        Finish(k);
        continue;
      }
      auto [cache, row] = Prefill(model_, r.spec, *r.result);
      r.result->sequences.resize(r.spec.num_samples);
      r.decoding = r.spec.num_samples;
      for (int i = 0; i < r.spec.num_samples; ++i) {
        active_.push_back({k, &r.result->sequences[i],
                           at::make_generator<at::CPUGeneratorImpl>(Mix(r.spec.settings.seed ^ Mix(i))), cache});
        row_of.push_back(static_cast<int64_t>(rows.size()));
      }
      rows.push_back(row);
    }
    if (rows.empty()) return;
    BatchInvariantScope invariant;
    at::Tensor first = FullLogits(model_, at::cat(rows)).index_select(0, OnDevice(at::tensor(row_of, at::kLong), model_.device()));
    last_ = last_.defined() && last_.size(0) > 0 ? at::cat({last_, first}) : first;
    CountCompany();
  }

  // Draws a token for every sequence; finished requests are reported; the
  // rest run one batch-invariant forward step for their next logits.
  void Step() {
    at::Tensor lps = at::log_softmax(last_, -1);
    std::vector<int64_t> next;
    std::vector<Decoding> still;
    for (size_t j = 0; j < active_.size(); ++j) {
      Decoding& d = active_[j];
      Request& r = requests_[d.request];
      if (r.finished) continue;  // failed at an earlier sequence of this step
      const SamplingSettings& s = r.spec.settings;
      // Drawn on the host with the sequence's CPU generator, whatever the
      // device: the seeded stream is the same everywhere (docs/sampling.md).
      const std::optional<int32_t> drawn = Draw(last_[j].cpu(), s, d.gen);
      if (!drawn.has_value()) {
        // Only this request fails; the others decode on.
        r.result = NotDrawable(s);
        Finish(d.request);
        continue;
      }
      const int32_t token = *drawn;
      d.out->tokens.push_back(token);
      d.out->logprobs.push_back(lps[j][token].item<float>());
      d.out->stopped = EndsWithStop(d.out->tokens, s);
      if (d.out->stopped || static_cast<int64_t>(d.out->tokens.size()) >= s.max_tokens) {
        if (--requests_[d.request].decoding == 0) Finish(d.request);
        continue;
      }
      next.push_back(token);
      still.push_back(std::move(d));
    }
    // A request that failed after some of its sequences moved on drops them.
    std::vector<int64_t> kept_next;
    std::vector<Decoding> kept;
    for (size_t j = 0; j < still.size(); ++j) {
      if (requests_[still[j].request].finished) continue;
      kept_next.push_back(next[j]);
      kept.push_back(std::move(still[j]));
    }
    next = std::move(kept_next);
    active_ = std::move(kept);
    if (active_.empty()) {
      last_ = at::Tensor();
      return;
    }
    BatchInvariantScope invariant;
    std::vector<SequenceState> batch;
    for (Decoding& d : active_) batch.push_back(std::move(d.cache));
    at::Tensor h =
        model_.Hidden(OnDevice(at::tensor(next, at::kLong), model_.device()), std::vector<int64_t>(active_.size(), 1), nullptr, &batch);
    for (size_t j = 0; j < active_.size(); ++j) active_[j].cache = std::move(batch[j]);
    last_ = FullLogits(model_, h);
    CountCompany();
  }

  // Each decoding request notes how many requests decode beside it.
  void CountCompany() {
    std::vector<size_t> live;
    for (const Decoding& d : active_) live.push_back(d.request);
    std::sort(live.begin(), live.end());
    live.erase(std::unique(live.begin(), live.end()), live.end());
    for (size_t k : live) {
      Generation& g = *requests_[k].result;
      g.batched_requests = std::max(g.batched_requests, static_cast<int>(live.size()));
    }
  }

  void Finish(size_t k) {
    requests_[k].finished = true;
    if (hooks_.done) hooks_.done(k, std::move(requests_[k].result));
  }

  const DecoderModel& model_;
  const int64_t max_seq_len_;
  const DecodeHooks& hooks_;
  std::deque<Request> requests_;  // stable addresses: sequences point into results
  std::vector<Decoding> active_;
  at::Tensor last_;  // [active, V]
};

}  // namespace

void Decode(const DecoderModel& model, std::vector<SampleRequest> requests, int64_t max_seq_len,
            const DecodeHooks& hooks) {
  at::NoGradGuard no_grad;
  Decoder(model, max_seq_len, hooks).Run(std::move(requests));
}

std::vector<absl::StatusOr<Generation>> GenerateBatch(const DecoderModel& model,
                                                      const std::vector<SampleRequest>& requests,
                                                      int64_t max_seq_len) {
  std::vector<absl::StatusOr<Generation>> results(requests.size(), absl::InternalError("not generated"));
  DecodeHooks hooks;
  hooks.done = [&](size_t k, absl::StatusOr<Generation> result) { results[k] = std::move(result); };
  Decode(model, requests, max_seq_len, hooks);
  return results;
}

absl::StatusOr<Generation> Generate(const DecoderModel& model, const std::vector<int32_t>& prompt, int num_samples,
                                    const SamplingSettings& s, bool prompt_logprobs, int64_t max_seq_len,
                                    int64_t topk) {
  SampleRequest r;
  r.prompt = prompt;
  r.num_samples = num_samples;
  r.settings = s;
  r.prompt_logprobs = prompt_logprobs;
  r.topk_prompt_logprobs = topk;
  return std::move(GenerateBatch(model, {r}, max_seq_len)[0]);
}

absl::StatusOr<std::vector<float>> PromptLogprobs(const DecoderModel& model, const std::vector<int32_t>& prompt) {
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  at::NoGradGuard no_grad;
  at::Tensor ids =
      OnDevice(at::tensor(std::vector<int64_t>(prompt.begin(), prompt.end()), at::kLong), model.device());
  return OfPrompt(model, model.Hidden(ids, {ids.size(0)}, nullptr), ids);
}

}  // namespace lathe::runtime

// Generation from a loaded model with a KV cache: prefill each prompt once,
// then decode every sample of every request one token per step, batched; sampling with
// temperature, top-k, top-p, a seed and stop sequences. Under tensor
// parallelism each rank gathers the whole vocabulary's logits, so every rank
// of a replica draws the same tokens; all of them must call Generate with
// the same arguments (cross-rank rule of DecoderModel).
#ifndef LATHE_RUNTIME_GENERATE_H_
#define LATHE_RUNTIME_GENERATE_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "core/sampling_settings.h"

namespace lathe::runtime {

class DecoderModel;

struct GeneratedSequence {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;  // of each token under the model (temperature 1)
  bool stopped = false;         // a stop sequence ended it (else max_tokens)
};

struct Generation {
  std::vector<GeneratedSequence> sequences;
  // With prompt logprobs: [P], position 0 NaN (no context), position i the
  // logprob of prompt[i] after prompt[0..i-1].
  std::vector<float> prompt_logprobs;
  // With topk_prompt_logprobs k > 0: [P, k] row-major, the k likeliest tokens
  // at each prompt position and their logprobs; row 0 (no context) is empty
  // cells (token 0, logprob -99999).
  std::vector<int32_t> topk_ids;
  std::vector<float> topk_logprobs;
  // The most requests that decoded together while this one did (itself included).
  int batched_requests = 0;
};

// One sampling request.
struct SampleRequest {
  std::vector<int32_t> prompt;
  int num_samples = 1;
  SamplingSettings settings;
  bool prompt_logprobs = false;
  int64_t topk_prompt_logprobs = 0;
};

// How a Decode learns of requests that join it and reports finished ones.
struct DecodeHooks {
  // Called after every decode step on every rank of the replica, which must
  // all get the same requests: the requests that join now. The argument is
  // the number of samples still decoding. Null: nobody joins.
  std::function<std::vector<SampleRequest>(int decoding)> join;
  // Request k (numbered in the order given, then joined) is finished, or
  // refused (InvalidArgument, see GenerateBatch).
  std::function<void(size_t k, absl::StatusOr<Generation> result)> done;
};

// Decodes `requests` and whatever joins them until every sample is finished:
// each prompt is prefilled alone, then the samples of all requests decode
// together, one token per step, with batch-invariant products
// (BatchInvariantScope), so a request's tokens and logprobs are bitwise the
// same whichever requests share its batch, whenever they join or leave (and
// equal to Generate's). Sample s of a request draws from its own generator
// seeded by (seed, s): a request gives the same tokens wherever it runs and
// its samples differ. A request gets InvalidArgument for an empty prompt,
// num_samples < 1, settings that break ValidateSamplingSettings, a prompt
// plus max_tokens beyond `max_seq_len` (0: no limit), topk_prompt_logprobs
// outside [0, vocab_size]; the other requests still run.
void Decode(const DecoderModel& model, std::vector<SampleRequest> requests, int64_t max_seq_len,
            const DecodeHooks& hooks);

// Decode without joiners; the results in request order.
std::vector<absl::StatusOr<Generation>> GenerateBatch(const DecoderModel& model,
                                                      const std::vector<SampleRequest>& requests,
                                                      int64_t max_seq_len);

// One request: GenerateBatch({request})[0].
absl::StatusOr<Generation> Generate(const DecoderModel& model, const std::vector<int32_t>& prompt, int num_samples,
                                    const SamplingSettings& settings, bool prompt_logprobs, int64_t max_seq_len,
                                    int64_t topk_prompt_logprobs = 0);

// Generation::prompt_logprobs alone: one forward, no cache, no decoding.
// InvalidArgument for an empty prompt. Cross-rank rule as Generate.
absl::StatusOr<std::vector<float>> PromptLogprobs(const DecoderModel& model, const std::vector<int32_t>& prompt);

}  // namespace lathe::runtime

#endif  // LATHE_RUNTIME_GENERATE_H_

// generate_bench: decode throughput of runtime/generate on one process:
// `--requests` requests (distinct prompts) of `--samples` sequences of
// `--max_tokens` tokens, decoded in one batch, after an untimed warmup.
// Prints one JSON line; bench/sample_throughput.py --in-process drives it.
#include <algorithm>
#include <chrono>
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "runtime/decoder_model.h"
#include "runtime/generate.h"

ABSL_FLAG(std::string, model, "", "Hugging Face model folder");
ABSL_FLAG(int, requests, 1, "requests decoded together");
ABSL_FLAG(int, samples, 1, "sequences per request");
ABSL_FLAG(int64_t, max_tokens, 64, "tokens per sequence");
ABSL_FLAG(int64_t, prompt_tokens, 32, "prompt length");
ABSL_FLAG(double, temperature, 1.0, "sampling temperature; 0: greedy");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  lathe::runtime::LoraSettings lora;
  lora.rank = 0;  // the base model
  auto model = lathe::runtime::DecoderModel::Load(absl::GetFlag(FLAGS_model), lora);
  if (!model.ok()) return std::fprintf(stderr, "%s\n", model.status().ToString().c_str()), 1;
  std::vector<lathe::runtime::SampleRequest> requests(absl::GetFlag(FLAGS_requests));
  // Prompt tokens spread over the vocabulary's first 1000 ids (all of a smaller one).
  const int64_t span = std::min<int64_t>(1000, (*model)->config().vocab_size - 1);
  for (size_t r = 0; r < requests.size(); ++r) {
    for (int64_t i = 0; i < absl::GetFlag(FLAGS_prompt_tokens); ++i) {
      requests[r].prompt.push_back(static_cast<int32_t>((7 + 13 * i + 31 * static_cast<int64_t>(r)) % span + 1));
    }
    requests[r].num_samples = absl::GetFlag(FLAGS_samples);
    requests[r].settings.seed = r;
    requests[r].settings.temperature = absl::GetFlag(FLAGS_temperature);
  }
  auto run = [&](int64_t tokens) {
    for (auto& r : requests) r.settings.max_tokens = tokens;
    return lathe::runtime::GenerateBatch(**model, requests, 0);
  };
  for (const auto& w : run(4)) {
    if (!w.ok()) return std::fprintf(stderr, "%s\n", w.status().ToString().c_str()), 1;
  }
  const auto start = std::chrono::steady_clock::now();
  auto generations = run(absl::GetFlag(FLAGS_max_tokens));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  int64_t tokens = 0;
  for (const auto& g : generations) {
    if (!g.ok()) return std::fprintf(stderr, "%s\n", g.status().ToString().c_str()), 1;
    for (const auto& seq : g->sequences) tokens += static_cast<int64_t>(seq.tokens.size());
  }
  std::printf("{\"tokens_per_s\": %.2f, \"tokens\": %lld, \"seconds\": %.3f}\n", tokens / seconds,
              static_cast<long long>(tokens), seconds);
  return 0;
}

// generate_bench: decode throughput of runtime/generate on one process:
// `--samples` sequences of `--max_tokens` tokens from one prompt, after an
// untimed warmup. Prints one JSON line; bench/sample_throughput.py drives it.
#include <chrono>
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "runtime/decoder_model.h"
#include "runtime/generate.h"

ABSL_FLAG(std::string, model, "", "Hugging Face model folder");
ABSL_FLAG(int, samples, 1, "sequences decoded together");
ABSL_FLAG(int64_t, max_tokens, 64, "tokens per sequence");
ABSL_FLAG(int64_t, prompt_tokens, 32, "prompt length");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  lathe::runtime::LoraSettings lora;
  lora.rank = 0;  // the base model
  auto model = lathe::runtime::DecoderModel::Load(absl::GetFlag(FLAGS_model), lora);
  if (!model.ok()) return std::fprintf(stderr, "%s\n", model.status().ToString().c_str()), 1;
  std::vector<int32_t> prompt;
  for (int64_t i = 0; i < absl::GetFlag(FLAGS_prompt_tokens); ++i) prompt.push_back(static_cast<int32_t>(7 + 13 * i));
  lathe::runtime::SamplingSettings s;
  s.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  s.seed = 1;
  auto run = [&](int64_t tokens) {
    s.max_tokens = tokens;
    return lathe::runtime::Generate(**model, prompt, absl::GetFlag(FLAGS_samples), s, false, 0);
  };
  if (auto w = run(4); !w.ok()) return std::fprintf(stderr, "%s\n", w.status().ToString().c_str()), 1;
  const auto start = std::chrono::steady_clock::now();
  auto g = run(absl::GetFlag(FLAGS_max_tokens));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!g.ok()) return std::fprintf(stderr, "%s\n", g.status().ToString().c_str()), 1;
  int64_t tokens = 0;
  for (const auto& seq : g->sequences) tokens += static_cast<int64_t>(seq.tokens.size());
  std::printf("{\"tokens_per_s\": %.2f, \"tokens\": %lld, \"seconds\": %.3f}\n", tokens / seconds,
              static_cast<long long>(tokens), seconds);
  return 0;
}

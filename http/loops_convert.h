// Translation between Baseten Loops' wire bodies (JSON only) and lathe.v1
// messages. Pure functions, no I/O; the shapes are in docs/http-api.md
// ("Loops").
#ifndef LATHE_HTTP_LOOPS_CONVERT_H_
#define LATHE_HTTP_LOOPS_CONVERT_H_

#include <string>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "lathe/v1/service.pb.h"

namespace lathe::http {

// bt://loops:<run>/<kind>/<name> <-> lathe://<run>/<kind>/<name>. BtPath
// returns other text unchanged; LatheFromBt returns "" for text that is not
// a bt://loops: path.
std::string BtPath(absl::string_view lathe_path);
std::string LatheFromBt(absl::string_view bt_path);

// A Loops forward / forward_backward body ({data, loss_fn, loss_fn_config,
// ...}) as a lathe op on `run_id` at `seq_id`. Throws nlohmann::json::exception
// for a body of the wrong shape; InvalidArgument for what lathe cannot run
// (image chunks, text-valued loss config).
absl::Status LoopsForwardBackwardFromJson(const nlohmann::json& body, bool forward_only, const std::string& run_id,
                                          int64_t seq_id, lathe::v1::SubmitRequest* op);
// A lathe forward / forward_backward result as Loops' ForwardBackwardOutput:
// {loss, loss_fn_output_type, loss_fn_outputs: [{name: TensorData}], metrics}.
nlohmann::json LoopsForwardBackwardOutput(const lathe::v1::ForwardBackwardOutput& output);

// A Loops /sample body (prompt, n, temperature, top_p, top_k, max_tokens,
// seed, stop_token_ids, prompt_logprobs) as a lathe SampleOp; the weights
// are left for the caller to pin. Throws as above; InvalidArgument for what
// lathe cannot run: stop strings (no tokenizer), image chunks, structured
// outputs, routed experts, logprobs > 0 (top-k sampled logprobs).
absl::Status LoopsSampleFromJson(const nlohmann::json& body, lathe::v1::SampleOp* op);
// A lathe SampleResult as the OpenAI-completions-shaped /sample reply:
// {"choices": [{index, text, token_ids, logprobs: {token_logprobs, tokens},
// finish_reason, prompt_token_ids, prompt_logprobs}], "model", "object"}.
nlohmann::json LoopsCompletion(const lathe::v1::SampleOp& op, const lathe::v1::SampleResult& result,
                               const std::string& model);

}  // namespace lathe::http

#endif  // LATHE_HTTP_LOOPS_CONVERT_H_

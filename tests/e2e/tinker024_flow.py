"""The core Tinker flow with the JSON-only SDK (tinker 0.24.1), run by tests/e2e/test_http_tinker024.py
in .venv-tinker024: create a LoRA client, forward_backward, optim_step, forward_backward, forward,
save_state, sample through save_weights_and_get_sampling_client, and a client made from the saved
state with its optimizer (0.24.1 does that with weights_info, create_model and load_state). Prints
what it got as JSON: floats as the bits of their float32 (or the exact float64 repr)."""
from __future__ import annotations

import json
import sys

import numpy as np
import tinker


def main() -> None:
    url, key, base_model, sequences, lr, prompt = sys.argv[1], sys.argv[2], sys.argv[3], *map(
        json.loads, sys.argv[4:7])
    client = tinker.ServiceClient(base_url=url, api_key=key)
    data = [tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": tinker.types.TensorData.from_numpy(np.asarray(targets, np.int64)),
                        "weights": tinker.types.TensorData.from_numpy(np.ones(len(targets), np.float32))})
        for tokens, targets in sequences]

    def numbers(fb):
        return {"loss": fb.metrics["loss:sum"],
                "logprobs": [np.asarray(o["logprobs"].to_numpy(), np.float32).view(np.uint32).tolist()
                             for o in fb.loss_fn_outputs]}

    training = client.create_lora_training_client(base_model=base_model, rank=8, seed=3)
    out = {"model_id": training.model_id, "fb": []}
    out["fb"].append(numbers(training.forward_backward(data, "cross_entropy").result()))  # seq 1
    training.optim_step(tinker.types.AdamParams(learning_rate=lr)).result()              # seq 2
    out["fb"].append(numbers(training.forward_backward(data, "cross_entropy").result()))  # seq 3
    out["fb"].append(numbers(training.forward(data, "cross_entropy").result()))           # seq 4 (/forward)
    out["path"] = training.save_state("state").result().path                            # seq 5
    sampler = training.save_weights_and_get_sampling_client()                             # seq 6
    sampled = sampler.sample(tinker.types.ModelInput.from_ints(prompt), 2,
                             tinker.types.SamplingParams(max_tokens=8, temperature=0.0)).result()
    out["samples"] = [{"tokens": list(s.tokens), "logprobs": np.asarray(s.logprobs, np.float32).view(np.uint32).tolist()}
                      for s in sampled.sequences]
    resumed = client.create_training_client_from_state_with_optimizer(out["path"])
    out["resumed_model_id"] = resumed.model_id
    out["resumed"] = numbers(resumed.forward_backward(data, "cross_entropy").result())
    print(json.dumps(out))


if __name__ == "__main__":
    main()

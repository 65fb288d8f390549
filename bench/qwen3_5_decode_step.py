"""Per-step decode time of the tiny Qwen3.5 through lathe_harness: GenerateBatch of n
greedy requests for STEPS + 1 tokens minus the same for 1 token, over STEPS steps (best of 3).
Usage: python bench/qwen3_5_decode_step.py HARNESS MODEL_DIR [STEPS] (MODEL_DIR from
tests/parity/make_tiny_models.py qwen3_5; STEPS 64 unless given)."""
import json, subprocess, sys, time
exe, model = sys.argv[1], sys.argv[2]
def run(n_req, tokens):
    reqs = [{"prompt": [5 + i, 17, 3, 42, 8], "num_samples": 1, "max_tokens": tokens, "temperature": 0} for i in range(n_req)]
    json.dump({"lora": {"rank": 4}, "ops": [{"op": "generate_batch", "requests": reqs}]}, open("/tmp/qwen3_5_decode_step.json", "w"))
    t = time.perf_counter()
    subprocess.run([exe, "--model", model, "--request", "/tmp/qwen3_5_decode_step.json", "--out", "/tmp/qwen3_5_decode_step.safetensors"], check=True, capture_output=True)
    return time.perf_counter() - t
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 64
for n in (1, 8):
    short = min(run(n, 1) for _ in range(3)); long = min(run(n, steps + 1) for _ in range(3))
    print(f"{n} requests: {(long - short) / steps * 1000:.2f} ms per decode step")

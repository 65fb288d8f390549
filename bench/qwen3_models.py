"""Random-weight Qwen3 models for the benchmarks, written once by transformers."""
import os


def cached_qwen3(cache, name, shape, max_positions=131072):
    """The folder ``<cache>/<name>`` holding a Qwen3ForCausalLM of config ``shape``
    (seeded random weights), written on first use."""
    path = os.path.join(cache, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM
        print(f"[bench] writing the model to {path}", flush=True)
        torch.manual_seed(0)
        config = Qwen3Config(**shape, rope_theta=1e6, max_position_embeddings=max_positions)
        Qwen3ForCausalLM(config).save_pretrained(path)
    return path

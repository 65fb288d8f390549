"""Writes, without any network, what tinker-cookbook's ``recipes/sl_loop.py`` and
``recipes/rl_loop.py`` load, under one folder that the recipes then run in (test_cookbook.py):

* ``Qwen/Qwen3-8B/``: a byte-level BPE tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)
  with Qwen3's chat tokens. The cookbook's ``get_tokenizer(name)`` loads a folder whose
  relative path is the model name, and its registry gives ``Qwen/Qwen3-8B`` the ``qwen3``
  renderer, which needs ``<|im_start|>`` and ``<|im_end|>`` as single tokens and stops
  sampling on ``<|im_end|>``'s id (a token-id stop, which the HTTP door serves).
* ``HuggingFaceH4/no_robots/`` and ``openai/gsm8k/`` (config ``main``): small parquet
  datasets in the layout ``datasets.load_dataset`` reads from a local folder.
* ``model/``: a tiny random Qwen3 (dense) whose vocabulary is the tokenizer's, for
  ``dp_worker --model``.

The model is random but shaped: every token embedding carries one constant component,
which the final norm turns into a fixed direction, and ``lm_head``'s column for it
gives ``\\boxed{1}`` (one added token) and ``<|im_end|>`` each about a fifth of the
probability at every position. So a sampled answer contains ``\\boxed{1}``, the right
answer of every question here, about half the time: groups of samples get mixed
rewards, and rl_loop, which skips groups whose rewards are all equal, trains.

Run with the cookbook's interpreter: ``python cookbook_fixtures.py OUT_DIR``; prints
``{"model_dir", "model_name", "vocab_size"}`` as JSON.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

MODEL_NAME = "Qwen/Qwen3-8B"
ANSWER_TOKEN = "\\boxed{1}"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

SL_ROWS = 16
RL_ROWS = 8

_SUBJECTS = ["the sea", "a tree", "the sky", "a river", "the moon", "a field", "the snow", "a stone"]


def sl_rows() -> list[dict]:
    """no_robots-shaped rows: a short question and an answer of one fixed pattern."""
    rows = []
    for i in range(SL_ROWS):
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        question = f"Describe {subject} in one sentence."
        answer = f"Sure. Here is one sentence: {subject} is calm and quiet today."
        rows.append({"prompt": question, "prompt_id": f"{i:04d}", "category": "Generation",
                     "messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}]})
    return rows


def rl_rows() -> list[dict]:
    """gsm8k-shaped rows whose final answer is 1."""
    return [{"question": f"Tom has {n} apples and gives away {n - 1}. How many apples does Tom have now?",
             "answer": f"Tom gives away {n - 1} of {n} apples, so {n} - {n - 1} = 1.\n#### 1"}
            for n in range(2, 2 + RL_ROWS)]


def write_datasets(out: str) -> None:
    sl = os.path.join(out, "HuggingFaceH4", "no_robots", "data")
    os.makedirs(sl, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(sl_rows()), os.path.join(sl, "train-00000-of-00001.parquet"))
    rl = os.path.join(out, "openai", "gsm8k")
    os.makedirs(os.path.join(rl, "main"), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rl_rows()), os.path.join(rl, "main", "train-00000-of-00001.parquet"))
    # The named config ("main") comes from the dataset card, as on the Hub.
    with open(os.path.join(rl, "README.md"), "w") as f:
        f.write("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n---\n")


def write_tokenizer(out: str) -> tuple[int, Tokenizer]:
    corpus = []
    for row in sl_rows():
        corpus += [m["content"] for m in row["messages"]]
    for row in rl_rows():
        corpus += [row["question"], row["answer"]]
    corpus += ["How many r's are in strawberry? Provide a numerical answer without units, written inside \\boxed{}.",
               "Let's spell the word out and number all the letters."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in ("<think>", "</think>", ANSWER_TOKEN)])
    folder = os.path.join(out, *MODEL_NAME.split("/"))
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "add_prefix_space": False, "model_max_length": 4096}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return tok.get_vocab_size(with_added_tokens=True), tok


def write_model(out: str, tok: Tokenizer, vocab: int) -> str:
    h, layers, heads, kv_heads, head_dim, inter = 64, 2, 4, 2, 16, 128
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.normal(0.0, 0.02, shape).astype(np.float32)

    t = {}
    embed = normal(vocab, h)
    embed[:, 0] = 1.0  # the constant component (see the module docstring)
    t["model.embed_tokens.weight"] = embed
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        t[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, h)
        t[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, h)
        t[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, h)
        t[p + "self_attn.o_proj.weight"] = normal(h, heads * head_dim)
        t[p + "self_attn.q_norm.weight"] = np.ones(head_dim, np.float32)
        t[p + "self_attn.k_norm.weight"] = np.ones(head_dim, np.float32)
        t[p + "mlp.gate_proj.weight"] = normal(inter, h)
        t[p + "mlp.up_proj.weight"] = normal(inter, h)
        t[p + "mlp.down_proj.weight"] = normal(h, inter)
    t["model.norm.weight"] = np.ones(h, np.float32)
    # After the final RMSNorm the constant component is about sqrt(h / (1 + (h-1) * 0.02^2)).
    scale = float(np.sqrt(h / (1 + (h - 1) * 0.02 ** 2)))
    bias = np.zeros(vocab, np.float32)
    favoured = [tok.token_to_id(ANSWER_TOKEN), tok.token_to_id("<|im_end|>")]
    bias[favoured] = np.log(0.2 * (vocab - 2) / 0.6)  # each ~0.2, the other tokens share ~0.6
    for s in ("<|endoftext|>", "<|im_start|>"):
        bias[tok.token_to_id(s)] = -20.0
    head = normal(vocab, h)
    head[:, 0] = bias / scale
    t["lm_head.weight"] = head
    folder = os.path.join(out, "model")
    os.makedirs(folder, exist_ok=True)
    save_file(t, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab,
              "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "tie_word_embeddings": False, "attention_bias": False,
              "torch_dtype": "float32"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder


def main(out: str) -> None:
    write_datasets(out)
    vocab, tok = write_tokenizer(out)
    model_dir = write_model(out, tok, vocab)
    print(json.dumps({"model_dir": model_dir, "model_name": MODEL_NAME, "vocab_size": vocab}))


if __name__ == "__main__":
    main(sys.argv[1])

"""Check a metapeft GGUF LoRA export in llama.cpp (outside CI).

Compares llama.cpp's next-token distribution for a prompt, with and without the LoRA, against
what metapeft computed (`metapeft generate --json --logprobs 5`). llama.cpp runs the Q4_1 weights
through its quantized kernels and metapeft dequantizes to f32, so numbers differ by up to ~0.1 in
log-probability; a wrong export (orientation, Q/K permutation, scale folding) changes the
distribution completely.

    pip install llama-cpp-python numpy
    metapeft export --adapter ADAPTER --format gguf-lora --out lora.gguf
    metapeft generate --prompt "The capital of France is" --max-new-tokens 4 --logprobs 5 --json > base.json
    metapeft generate --adapter ADAPTER --prompt "The capital of France is" --max-new-tokens 4 --logprobs 5 --json > lora.json
    python check_gguf_lora_llamacpp.py BASE.gguf lora.gguf base.json lora.json
"""
import json
import sys

import numpy as np
from llama_cpp import Llama


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def run(model, lora, ours):
    kw = dict(model_path=model, n_ctx=128, n_threads=2, logits_all=True, verbose=False, seed=0)
    if lora:
        kw["lora_path"] = lora
    llm = Llama(**kw)
    ids = ours["prompt_ids"]
    llm.eval(ids)
    worst = 0.0
    same = 0
    for step, tok in zip(ours["steps"], ours["generated_ids"]):
        lp = log_softmax(llm.scores[llm.n_tokens - 1])
        top = int(lp.argmax())
        same += top == step["ids"][0]
        for i, l in zip(step["ids"], step["logprobs"]):
            worst = max(worst, abs(lp[i] - l))
        llm.eval([tok])  # follow metapeft's tokens
    return same, len(ours["steps"]), worst


def main():
    model, lora, base_json, lora_json = sys.argv[1:5]
    ok = True
    for name, path, adapter in [("base", base_json, None), ("lora", lora_json, lora)]:
        ours = json.load(open(path))
        same, n, worst = run(model, adapter, ours)
        print(f"{name}: llama.cpp top-1 equals metapeft's at {same}/{n} steps; max |dlogprob| over metapeft's top-5: {worst:.3f}")
        ok &= same == n and worst < 0.35
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

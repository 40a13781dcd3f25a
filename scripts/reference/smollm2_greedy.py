#!/usr/bin/env python3
"""Reference fixtures for SmolLM2-135M-Instruct (GGUF, Q4_1).

Loads the GGUF through transformers (which dequantizes every tensor to
float32 and undoes llama.cpp's Q/K row permutation), then:

* runs greedy decoding (plain argmax, 24 new tokens, no BOS added, no
  repetition penalty, no EOS stop) for a fixed list of prompts and writes
  tests/fixtures/smollm2_greedy.json;
* tokenizes a fixed list of strings and writes
  tests/fixtures/smollm2_tokenizer.json.

Usage:
    python smollm2_greedy.py /path/to/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--out tests/fixtures/smollm2_greedy.json] \
        [--tok-out tests/fixtures/smollm2_tokenizer.json]
"""

import argparse
import json
import os

import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
N_NEW = 24

CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]

PLAIN_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "Once upon a time",
    "In 1969, 3 astronauts",
    "Café résumé naïve",
    "Here is a shopping list:\n1. Apples\n2. Bread\n3.",
    "The capital of France is",
]

TOKENIZER_STRINGS = [
    "",
    "Hello world",
    "12345",
    "In 1969, 3 astronauts",
    "price: $3.14 and 1,000,000",
    "x =  42",  # two spaces before a digit: pre-tokenizer sensitive
    "Café résumé naïve",
    "日本語のテキスト",
    "emoji 🦀🚀!",
    "a  b   c",
    "   leading and trailing   ",
    "line1\nline2\n\n\nline5",
    "\t\ttabs\tand\r\nCRLF",
    "I'm sure they'll say we've DONE it's",
    "<|im_start|>user\nHello!<|im_end|>\n",
    "<|endoftext|>",
    "def f(x):\n    return x**2 + 1\n",
]


def llamacpp_style_tokenizer(tok):
    """Same vocab/merges, but with llama.cpp's 'smollm' pre-tokenizer.

    llama.cpp splits with `\\p{N}` (each digit isolated) before the GPT-2
    regex; transformers' GGUF converter only installs the GPT-2 ByteLevel
    regex. Digits(individual_digits) + ByteLevel reproduces llama.cpp.
    """
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False,
             "trim_offsets": True, "use_regex": True},
        ],
    }
    return Tokenizer.from_str(json.dumps(spec))


def tokenizer_fixture(tok, chat_prompt):
    alt = llamacpp_style_tokenizer(tok)
    cases = []
    for s in TOKENIZER_STRINGS + [chat_prompt]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        alt_ids = alt.encode(s, add_special_tokens=False).ids
        cases.append({
            "text": s,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decoded": tok.decode(ids, skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False),
            "ids_llamacpp_pretok": alt_ids,
            "pretok_agrees": ids == alt_ids,
        })
        if ids != alt_ids:
            print(f"NOTE pre-tokenizer divergence for {s!r}: hf={ids} llama.cpp-style={alt_ids}")
    return {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "transformers_version": transformers.__version__,
        "add_special_tokens": False,
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "hf_pre_tokenizer": json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"],
        "note": "ids: transformers GGUF tokenizer (GPT-2 ByteLevel regex only). "
                "ids_llamacpp_pretok: same BPE with Digits(individual)+ByteLevel, "
                "i.e. llama.cpp's 'smollm' pre-tokenizer.",
        "cases": cases,
    }


@torch.inference_mode()
def greedy_case(model, tok, prompt):
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    logits = model(ids).logits[0, -1].float()
    lp = torch.log_softmax(logits, dim=-1)
    top5 = torch.topk(lp, 5)
    case = {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "last_logits_head": [float(x) for x in logits[:16]],
        "last_top5_ids": [int(i) for i in top5.indices],
        "last_top5_logprobs": [float(x) for x in top5.values],
        "last_top5_logits": [float(logits[i]) for i in top5.indices],
    }
    steps, generated = [], []
    past = None
    for _ in range(N_NEW):
        t2 = torch.topk(lp, 2)
        nxt = int(t2.indices[0])  # == argmax
        steps.append({
            "id": nxt,
            "top2_ids": [int(i) for i in t2.indices],
            "top2_logprobs": [float(x) for x in t2.values],
        })
        generated.append(nxt)
        # Full recompute (no KV cache): simplest, unambiguous reference.
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        lp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
    case["generated_ids"] = generated
    case["generated_text"] = tok.decode(generated, skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)
    case["min_top2_margin"] = min(s["top2_logprobs"][0] - s["top2_logprobs"][1] for s in steps)
    case["steps"] = steps
    return case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/smollm2_greedy.json"))
    ap.add_argument("--tok-out", default=os.path.join(REPO, "tests/fixtures/smollm2_tokenizer.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(2)
    d, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()

    chat_prompt = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    print("ChatML prompt:", repr(chat_prompt))

    tok_fx = tokenizer_fixture(tok, chat_prompt)
    os.makedirs(os.path.dirname(args.tok_out), exist_ok=True)
    with open(args.tok_out, "w", encoding="utf-8") as f:
        json.dump(tok_fx, f, ensure_ascii=False, indent=1)
    print("wrote", args.tok_out)

    cases = []
    for p in [chat_prompt] + PLAIN_PROMPTS:
        c = greedy_case(model, tok, p)
        print(f"{p!r} -> {c['generated_text']!r} (min margin {c['min_top2_margin']:.4f})")
        cases.append(c)
    out = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32 (all GGUF tensors dequantized by transformers)",
        "decoding": f"greedy argmax, {N_NEW} new tokens, no BOS, no repetition penalty, no EOS stop, "
                    "full recompute each step",
        "chat_messages": CHAT_MESSAGES,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()

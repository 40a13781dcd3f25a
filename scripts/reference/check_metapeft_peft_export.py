#!/usr/bin/env python3
"""Check a PEFT-format adapter written by metapeft against Hugging Face PEFT.

Loads the base model, attaches the adapter with `PeftModel.from_pretrained`
(eval mode), runs each prompt of the logits file through the PeftModel forward
(prompt/prefix tuning prepend their virtual tokens there) and compares the
logits at the last prompt position with the ones metapeft wrote.

Logits file (written by metapeft):
    {"prompts": [{"prompt_ids": [...], "last_logits": [first N floats]}, ...]}
`last_logits` holds the first N vocabulary entries (N = 64 by convention; any
N works). Extra keys are ignored.

Usage:
    python scripts/reference/check_metapeft_peft_export.py BASE_DIR ADAPTER_DIR LOGITS_JSON [--tol 1e-4]

Prints the max abs difference per prompt and overall; exits 1 if the overall
difference exceeds --tol (default 1e-4), 2 on a malformed logits file.
"""

import argparse
import json
import sys

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base", help="Hugging Face base model directory (e.g. /tmp/smollm2-hf)")
    ap.add_argument("adapter", help="PEFT adapter directory written by metapeft "
                                    "(adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("logits", help="JSON file of logits written by metapeft")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    torch.set_num_threads(2)
    with open(args.logits) as f:
        spec = json.load(f)
    prompts = spec.get("prompts") if isinstance(spec, dict) else None
    if not prompts or any("prompt_ids" not in p or "last_logits" not in p for p in prompts):
        print(f"{args.logits}: expected {{\"prompts\": [{{\"prompt_ids\": [...], \"last_logits\": [...]}}]}}")
        return 2

    cfg = PeftConfig.from_pretrained(args.adapter)
    peft_type = getattr(cfg.peft_type, "value", cfg.peft_type)
    print(f"adapter: {args.adapter} ({peft_type}, base_model_name_or_path={cfg.base_model_name_or_path!r})")
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter).eval()

    worst = 0.0
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            ids = torch.tensor([p["prompt_ids"]], dtype=torch.long)
            want = torch.tensor(p["last_logits"], dtype=torch.float32)
            got = model(input_ids=ids).logits[0, -1, : want.numel()].float()
            d = (got - want).abs().max().item() if want.numel() else 0.0
            if not d == d:  # NaN
                d = float("inf")
            worst = max(worst, d)
            print(f"prompt {i}: {len(p['prompt_ids'])} ids, {want.numel()} logits, max abs diff {d:.3e}")

    ok = worst <= args.tol
    print(f"max abs diff {worst:.3e} (tol {args.tol:g}): {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

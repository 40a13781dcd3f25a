#!/usr/bin/env python3
"""Reference PEFT adapters for SmolLM2-135M-Instruct plus the outputs they produce.

Creates small Hugging Face PEFT adapters with `peft.get_peft_model` on a fresh
copy (deepcopy of a pristine load) of the base model, saves each with
`save_pretrained` (safetensors), loads each back with
`PeftModel.from_pretrained` (eval mode), and records logits and greedy
continuations. The references therefore describe the *saved* adapter
files (for prefix tuning: the folded `prompt_embeddings`, not the MLP).

Every adapter is also re-evaluated without PEFT: the script reads
`adapter_model.safetensors` and `adapter_config.json` itself, applies the
method to the plain transformers model (LoRA / IA3 via forward hooks, prompt
embeddings concatenated to `inputs_embeds`, prefix placed in a `DynamicCache`
with the real tokens at positions `num_virtual_tokens..`), and checks that the
logits match PEFT's. LoRA and IA3 are checked twice: unmerged (forward hooks,
`independent_check_max_abs_diff`, must be < 1e-4) and folded into the base
weights (`merged_check_max_abs_diff`, < 1e-3, float32 rounding differs). These
re-implementations document the conventions a loader has to follow.

Usage:
    python scripts/reference/peft_fixtures.py [/tmp/smollm2-hf] \
        [--out tests/fixtures/peft]

Writes out/<adapter>/{adapter_config.json,adapter_model.safetensors} and
out/expected.json.
"""

import argparse
import copy
import json
import math
import os
import re
import shutil

import peft
import safetensors
import torch
import transformers
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BASE_NAME = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
N_NEW = 12
N_HEAD_LOGITS = 32
CHECK_TOL = 1e-4
MERGED_TOL = 1e-3  # folding into f32 weights changes rounding; 30 layers amplify it


# --------------------------------------------------------------------------
# Adapter definitions
# --------------------------------------------------------------------------

def cfg_lora_qv_down():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM")


def cfg_lora_rslora_patterns():
    # peft rejects layers_to_transform / layers_pattern together with a str target_modules
    # (LoraConfig.__post_init__: "`layers_to_transform` cannot be used when `target_modules` is a str."),
    # so the layer restriction 0, 5, 29 is written into the regex itself.
    return LoraConfig(r=4, lora_alpha=16, use_rslora=True,
                      target_modules=r".*\.layers\.(0|5|29)\..*\.(q_proj|o_proj|up_proj)",
                      rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 4},
                      init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM")


def cfg_lora_layers_list():
    # The list form, where layers_to_transform is allowed. The second rank_pattern key is a
    # regex that only matches layer 29's q_proj (matched as `(.*\.)?(key)$`).
    return LoraConfig(r=4, lora_alpha=16, use_rslora=True,
                      target_modules=["q_proj", "o_proj", "up_proj"],
                      layers_to_transform=[0, 5, 29], layers_pattern="layers",
                      rank_pattern={"o_proj": 2, r"layers\.29\.self_attn\.q_proj": 3},
                      alpha_pattern={"up_proj": 4},
                      init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM")


def cfg_ia3():
    # init_ia3_weights=False keeps peft's torch.randn init (N(0, 1) per entry). The logits stay
    # finite and of normal magnitude (max |logit| ~ 27 vs ~20 for the base), the text is noise.
    return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                     init_ia3_weights=False, task_type="CAUSAL_LM")


def cfg_prompt_tuning():
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="RANDOM")


def cfg_prefix_tuning():
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                              encoder_hidden_size=64)


def post_prompt_tuning(model, base, notes):
    """RANDOM init is nn.Embedding's N(0, 1); rescale to the token embeddings' std."""
    emb = model.prompt_encoder["default"].embedding.weight
    tok_std = base.get_input_embeddings().weight.std().item()
    with torch.no_grad():
        emb.mul_(tok_std / emb.std().item())
    notes.append(f"prompt embedding (nn.Embedding N(0,1) init) rescaled to std {tok_std:.6f}, "
                 "the std of the model's token embedding matrix")


PREFIX_KV_STD = 0.5


def post_prefix_tuning(model, base, notes):
    """Rescale the last Linear of the prefix MLP (weight and bias) so the produced
    past_key_values have std PREFIX_KV_STD."""
    enc = model.prompt_encoder["default"]
    n = model.peft_config["default"].num_virtual_tokens
    with torch.no_grad():
        out = enc(torch.arange(n).unsqueeze(0))
        s = PREFIX_KV_STD / out.std().item()
        enc.transform[-1].weight.mul_(s)
        enc.transform[-1].bias.mul_(s)
    notes.append("prefix MLP: default init (embedding N(0,1), Linear kaiming-uniform), then the last "
                 f"Linear's weight and bias scaled by {s:.6f} so the produced past_key_values have std "
                 f"{PREFIX_KV_STD}; PEFT saves the MLP output (folded), see saved_tensors")


ADAPTERS = [
    # name, config factory, seed, post-creation hook
    ("lora_qv_down", cfg_lora_qv_down, 101, None),
    ("lora_rslora_patterns", cfg_lora_rslora_patterns, 102, None),
    ("lora_layers_list", cfg_lora_layers_list, 103, None),
    ("ia3", cfg_ia3, 104, None),
    ("prompt_tuning", cfg_prompt_tuning, 105, post_prompt_tuning),
    ("prefix_tuning", cfg_prefix_tuning, 106, post_prefix_tuning),
]


# --------------------------------------------------------------------------
# Reference outputs
# --------------------------------------------------------------------------

@torch.inference_mode()
def run_case(model, tok, prompt):
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(input_ids=ids).logits
    logits = out[0, -1].float()
    lp = torch.log_softmax(logits, dim=-1)
    top5 = torch.topk(logits, 5)
    case = {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "logits_seq_len": int(out.shape[1]),
        "last_logits_head": [float(x) for x in logits[:N_HEAD_LOGITS]],
        "last_top5_ids": [int(i) for i in top5.indices],
        "last_top5_logits": [float(x) for x in top5.values],
        "last_top5_logprobs": [float(lp[i]) for i in top5.indices],
    }
    steps, generated = [], []
    for _ in range(N_NEW):
        t2 = torch.topk(lp, 2)
        nxt = int(torch.argmax(lp))
        assert nxt == int(t2.indices[0])
        steps.append({"id": nxt, "top2_ids": [int(i) for i in t2.indices],
                      "top2_logprobs": [float(x) for x in t2.values]})
        generated.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        # Full recompute through the (Peft)Model forward: prompt/prefix tuning prepend each time.
        lp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
    case["generated_ids"] = generated
    case["generated_text"] = tok.decode(generated, skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)
    case["min_top2_margin"] = min(s["top2_logprobs"][0] - s["top2_logprobs"][1] for s in steps)
    case["steps"] = steps
    return case


# --------------------------------------------------------------------------
# Independent re-implementation from the saved files (no PEFT involved)
# --------------------------------------------------------------------------

PREFIX = "base_model.model."


def pattern_key(keys, name):
    """Same rule as peft.utils.other.get_pattern_key: first key with re.match(r'(.*\\.)?(key)$')."""
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None


def lora_modules(cfg, tensors):
    """(module name, A [r, in], B [out, r], scale) for every LoRA module in the file."""
    out = []
    for name in sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors}):
        a = tensors[f"{PREFIX}{name}.lora_A.weight"]
        b = tensors[f"{PREFIX}{name}.lora_B.weight"]
        r = a.shape[0]
        rk = pattern_key(cfg.get("rank_pattern") or {}, name)
        assert r == (cfg["rank_pattern"][rk] if rk else cfg["r"]), (name, r)
        ak = pattern_key(cfg.get("alpha_pattern") or {}, name)
        alpha = cfg["alpha_pattern"][ak] if ak else cfg["lora_alpha"]
        scale = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        out.append((name, a, b, scale))
    return out


def ia3_modules(tensors):
    """(module name, vector) for every IA3 module: [out, 1] or, for feedforward modules, [1, in]."""
    return [(k[len(PREFIX):].rsplit(".ia3_l", 1)[0], v) for k, v in sorted(tensors.items())]


def adapted_model(base, cfg, tensors, merged):
    """A copy of the base model with the adapter applied, either folded into the weights
    (merged=True) or on the fly with forward hooks in the same order of operations as PEFT."""
    m = copy.deepcopy(base).eval()
    mods = dict(m.named_modules())
    if cfg["peft_type"] == "LORA":
        for name, a, b, scale in lora_modules(cfg, tensors):
            if merged:
                with torch.no_grad():
                    mods[name].weight.add_((b @ a) * scale)  # W' = W + scale * B @ A
            else:
                mods[name].register_forward_hook(
                    lambda mod, inp, out, a=a, b=b, s=scale: out + ((inp[0] @ a.T) @ b.T) * s)
    elif cfg["peft_type"] == "IA3":
        for name, l in ia3_modules(tensors):
            ff = l.shape[0] == 1
            if merged:
                with torch.no_grad():
                    # W [out, in] * l: [out, 1] scales rows (outputs), [1, in] scales columns (inputs).
                    mods[name].weight.mul_(l)
            elif ff:
                mods[name].register_forward_pre_hook(lambda mod, inp, l=l: (inp[0] * l.flatten(),))
            else:
                mods[name].register_forward_hook(lambda mod, inp, out, l=l: out * l.flatten())
    else:
        raise ValueError(cfg["peft_type"])
    return m


@torch.inference_mode()
def independent_logits(base, cfg, tensors, prompt_ids, merged=False):
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    t = ids.shape[1]
    if cfg["peft_type"] in ("LORA", "IA3"):
        return adapted_model(base, cfg, tensors, merged)(input_ids=ids).logits[0, -1]
    if cfg["peft_type"] == "PROMPT_TUNING":
        p = tensors["prompt_embeddings"]  # [n_virtual, hidden]
        emb = torch.cat([p[None], base.get_input_embeddings()(ids)], dim=1)
        # No cache, no position_ids: virtual tokens sit at positions 0..n-1, prompt at n..
        out = base(inputs_embeds=emb).logits
        assert out.shape[1] == p.shape[0] + t
        return out[0, -1]
    if cfg["peft_type"] == "PREFIX_TUNING":
        flat = tensors["prompt_embeddings"]  # [n_virtual, n_layers * 2 * n_kv_heads * head_dim]
        n, L, H = cfg["num_virtual_tokens"], cfg["num_layers"], cfg["num_attention_heads"]
        d = cfg["token_dim"] // H
        kv = flat.view(n, L, 2, H, d)  # per layer: index 0 = key, 1 = value
        cache = DynamicCache(
            [(kv[:, l, 0].permute(1, 0, 2)[None], kv[:, l, 1].permute(1, 0, 2)[None]) for l in range(L)])
        # Prefix keys are used as stored (no RoPE); real tokens continue at positions n..n+t-1.
        pos = (torch.arange(t) + n)[None]
        return base(input_ids=ids, past_key_values=cache, position_ids=pos).logits[0, -1]
    raise ValueError(cfg["peft_type"])


# --------------------------------------------------------------------------


def tidy_config(path):
    """Make adapter_config.json reproducible and path-free: PEFT writes list(set) for
    target_modules/feedforward_modules (order depends on PYTHONHASHSEED) and the local base
    path as base_model_name_or_path."""
    with open(path) as f:
        cfg = json.load(f)
    written_base = cfg.get("base_model_name_or_path")
    cfg["base_model_name_or_path"] = BASE_NAME
    for k in ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save"):
        if isinstance(cfg.get(k), list):
            cfg[k] = sorted(cfg[k])
    with open(path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True))  # same layout as PeftConfig.save_pretrained
    return written_base, cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base", nargs="?", default="/tmp/smollm2-hf",
                    help="Hugging Face directory of SmolLM2-135M-Instruct (float32)")
    ap.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/peft"))
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.base)
    pristine = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    for p in pristine.parameters():
        p.requires_grad_(False)

    def fresh():
        return copy.deepcopy(pristine)

    os.makedirs(args.out, exist_ok=True)
    result = {
        "base_model": BASE_NAME,
        "prompts": PROMPTS,
        "decoding": f"prompt tokenized with add_special_tokens=False (no BOS); greedy argmax for {N_NEW} "
                    "new tokens, full recompute through model(input_ids) each step (PeftModel forward for "
                    "adapters), no EOS stop. last_logits_head = logits[vocab 0..31] at the last prompt "
                    "position; top-5 by logit.",
        "base": {"cases": [run_case(pristine, tok, p) for p in PROMPTS]},
        "adapters": {},
    }
    for c in result["base"]["cases"]:
        print(f"[base] {c['prompt']!r} -> {c['generated_text']!r}")

    for name, make_cfg, seed, post in ADAPTERS:
        torch.manual_seed(seed)
        notes = []
        model = get_peft_model(fresh(), make_cfg())
        if post is not None:
            post(model, pristine, notes)
        d = os.path.join(args.out, name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        model.save_pretrained(d, safe_serialization=True)
        readme = os.path.join(d, "README.md")
        if os.path.exists(readme):
            os.remove(readme)  # model card; not needed by a loader
        written_base, cfg = tidy_config(os.path.join(d, "adapter_config.json"))
        del model

        tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
        with safetensors.safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
            st_meta = f.metadata()

        loaded = PeftModel.from_pretrained(fresh(), d).eval()
        cases = [run_case(loaded, tok, p) for p in PROMPTS]
        del loaded

        def check(merged):
            diffs = []
            for c in cases:
                ref = independent_logits(pristine, cfg, tensors, c["prompt_ids"], merged)
                diffs.append(float((ref[:N_HEAD_LOGITS] - torch.tensor(c["last_logits_head"])).abs().max()))
                top = torch.topk(ref, 5)
                diffs.append(float((top.values - torch.tensor(c["last_top5_logits"])).abs().max()))
                assert [int(i) for i in top.indices] == c["last_top5_ids"], name
            return max(diffs)

        idiff = check(False)
        assert idiff < CHECK_TOL, f"{name}: independent re-implementation differs by {idiff}"
        mdiff = check(True) if cfg["peft_type"] in ("LORA", "IA3") else None
        if mdiff is not None:
            assert mdiff < MERGED_TOL, f"{name}: merged weights differ by {mdiff}"

        base_diff = max(
            max(abs(a - b) for a, b in zip(c["last_logits_head"], bc["last_logits_head"]))
            for c, bc in zip(cases, result["base"]["cases"]))
        entry = {
            "seed": seed,
            "peft_type": cfg["peft_type"],
            "notes": notes,
            "base_model_name_or_path_written_by_peft": written_base,
            "adapter_config": cfg,
            "safetensors_metadata": st_meta,
            "saved_tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
            "independent_check_max_abs_diff": idiff,
            "merged_check_max_abs_diff": mdiff,
            "max_abs_diff_vs_base_last_logits_head": base_diff,
            "cases": cases,
        }
        result["adapters"][name] = entry
        print(f"[{name}] {len(tensors)} tensors, independent check {idiff:.2e}, merged {mdiff}, vs base {base_diff:.3f}")
        for c in cases:
            print(f"    {c['prompt']!r} -> {c['generated_text']!r} (min margin {c['min_top2_margin']:.4f})")

    result["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }
    path = os.path.join(args.out, "expected.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()

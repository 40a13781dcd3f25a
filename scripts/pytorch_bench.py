#!/usr/bin/env python3
"""PyTorch + transformers + PEFT side of `metapeft bench`: the same training-step and forward
workloads on the same SmolLM2-135M-Instruct GGUF (dequantized to f32), on the CPU with 2 threads.

Each workload runs in its own child process so that its peak RSS (ru_maxrss, i.e. VmHWM, model
loading included as in the Rust bench) is its own. Prints a Markdown table like the Rust bench.

    /work/pyref/bin/python scripts/pytorch_bench.py [--runs 5] [--warmup 1] [--workload lora-qv ...]

Needs torch, transformers, peft and gguf; CI never runs it. Do not run it at the same time as the
Rust bench on a 2-core machine: they would share the cores.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

WORKLOADS = {
    "lora-qv": "LoRA r=8 on q,v: train step (fwd+bwd+AdamW), batch 4 x 128",
    "lora-all": "LoRA r=8 on all 7 linears: train step, batch 4 x 128",
    "full": "full fine-tuning: train step, batch 4 x 128",
    "forward": "forward, 1 x 128",
}
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gguf_path():
    home = os.environ.get("METAPEFT_HOME", os.path.expanduser("~/.metapeft"))
    for root, _, files in os.walk(home):
        for f in files:
            if f.startswith("SmolLM2-135M-Instruct") and f.endswith(".gguf"):
                return root, f
    sys.exit(f"no SmolLM2-135M-Instruct GGUF under {home} (set METAPEFT_HOME)")


def child(workload, runs, warmup, seq):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    root, name = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(root, gguf_file=name, dtype=torch.float32)
    vocab = model.config.vocab_size
    b = 1 if workload == "forward" else 4
    ids = torch.randint(0, vocab, (b, seq + 1))
    inp, tgt = ids[:, :seq], ids[:, 1:]

    if workload == "forward":
        model.eval()

        def step():
            with torch.no_grad():
                model(input_ids=inp).logits
    else:
        if workload == "full":
            params = list(model.parameters())
        else:
            from peft import LoraConfig, get_peft_model

            targets = ["q_proj", "v_proj"] if workload == "lora-qv" else ALL_LINEARS
            cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
            model = get_peft_model(model, cfg)
            params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            logits = model(input_ids=inp).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), tgt.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    secs = []
    for _ in range(runs):
        s = time.perf_counter()
        step()
        secs.append(time.perf_counter() - s)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"workload": workload, "seconds": secs, "peak_rss_mib": rss}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", action="append", choices=list(WORKLOADS))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.workload[0], a.runs, a.warmup, a.seq_len)
        return
    import torch

    print(f"torch {torch.__version__}, 2 threads, load average {os.getloadavg()}", file=sys.stderr)
    print("| workload | median s | min s | max s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for w in a.workload or list(WORKLOADS):
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--workload", w, "--runs", str(a.runs),
             "--warmup", str(a.warmup), "--seq-len", str(a.seq_len)],
            check=True, capture_output=True, text=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        s = r["seconds"]
        print(f"| {WORKLOADS[w]} | {statistics.median(s):.3f} | {min(s):.3f} | {max(s):.3f} "
              f"| {r['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch + transformers + PEFT side of `metapeft bench`: the same training-step and forward
workloads on the same SmolLM2-135M-Instruct GGUF (dequantized to f32), on the CPU with 2 threads.

Each workload runs in its own child process so that its peak RSS (ru_maxrss, i.e. VmHWM, model
loading included as in the Rust bench) is its own. Prints a Markdown table like the Rust bench.

    /work/pyref/bin/python scripts/pytorch_bench.py [--runs 5] [--warmup 1] [--workload lora-qv ...]

With `--side-by-side BINARY` it runs each workload alternately here and in `BINARY bench --child`
(metapeft), `--rounds` times, swapping which goes first every round, and prints both medians with
the time and memory ratios (metapeft / PyTorch; the median of the per-round time ratios, so a
slow minute hits both sides of a ratio alike):

    /work/pyref/bin/python scripts/pytorch_bench.py --side-by-side target/release/metapeft \
        --rounds 3 --runs 3 --workload lora-qv --workload forward

Needs torch, transformers, peft and gguf; CI never runs it. Do not run it at the same time as
anything else on a 2-core machine: they would share the cores.
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
    "forward-packed": "forward, 1 x 128 (metapeft: the inference layout, `--weights packed`)",
    "minilm-lora": "all-MiniLM-L6-v2 + LoRA r=8 (query,value) classifier step, 16 x 64",
    "fomaml": "FOMAML episode: 5 inner SGD steps on 4 x 128 + query gradient (LoRA q,v)",
    "generate": "greedy generation, 32-token prompt + 64 new tokens",
}
# Workloads that differ only on the metapeft side: PyTorch runs its own counterpart.
PYTORCH_SIDE = {"forward-packed": "forward"}
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def metapeft_home():
    """Where `metapeft assets` unpacks the models: $METAPEFT_HOME, else the user cache dir."""
    if os.environ.get("METAPEFT_HOME"):
        return os.environ["METAPEFT_HOME"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "metapeft")


def gguf_path():
    home = metapeft_home()
    for root, _, files in os.walk(home):
        for f in files:
            if f.startswith("SmolLM2-135M-Instruct") and f.endswith(".gguf"):
                return root, f
    sys.exit(f"no SmolLM2-135M-Instruct GGUF under {home} (set METAPEFT_HOME)")


def minilm_dir():
    home = metapeft_home()
    for root, _, files in os.walk(home):
        if "model.safetensors" in files and "minilm" in root.lower():
            return root
    sys.exit(f"no all-MiniLM-L6-v2 under {home} (set METAPEFT_HOME)")


def minilm_step():
    """As metapeft's `minilm-lora`: mean-pooled states, a 16-way linear head, AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir(), dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
    model = get_peft_model(model, cfg)
    model.train()
    b, t, labels = 16, 64, 16
    head = torch.nn.Linear(model.config.hidden_size, labels)
    ids = torch.randint(1000, model.config.vocab_size, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    target = torch.arange(b) % labels
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        states = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head(states.mean(1)), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def child(workload, runs, warmup, seq):
    workload = PYTORCH_SIDE.get(workload, workload)
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if workload == "minilm-lora":
        return timed(minilm_step(), workload, runs, warmup)
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
    elif workload == "generate":
        model.eval()
        prompt = ids[:1, :32]

        def step():
            with torch.no_grad():
                model.generate(prompt, do_sample=False, max_new_tokens=64, min_new_tokens=64)
    elif workload == "fomaml":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = get_peft_model(model, cfg)
        model.train()
        lora = [p for p in model.parameters() if p.requires_grad]
        query = torch.randint(0, vocab, (b, seq + 1))

        def loss_of(x):
            logits = model(input_ids=x[:, :seq]).logits
            return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))

        def step():
            init = [p.detach().clone() for p in lora]
            for _ in range(5):
                grads = torch.autograd.grad(loss_of(ids), lora)
                with torch.no_grad():
                    for p, g in zip(lora, grads):
                        p -= 0.05 * g
            torch.autograd.grad(loss_of(query), lora)
            with torch.no_grad():
                for p, v in zip(lora, init):
                    p.copy_(v)
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

    timed(step, workload, runs, warmup)


def timed(step, workload, runs, warmup):
    for _ in range(warmup):
        step()
    secs = []
    for _ in range(runs):
        s = time.perf_counter()
        step()
        secs.append(time.perf_counter() - s)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"workload": workload, "seconds": secs, "peak_rss_mib": rss}))


def run_child(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def side_by_side(binary, workloads, rounds, runs, warmup, seq):
    import torch

    print(f"torch {torch.__version__} vs {binary}, 2 threads, load average {os.getloadavg()}",
          file=sys.stderr)
    print("| workload | metapeft median s | PyTorch median s | time ratio (per round) "
          "| metapeft MiB | PyTorch MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for w in workloads:
        ours = [binary, "bench", "--child", "--workload", w, "--runs", str(runs),
                "--warmup", str(warmup)]
        theirs = [sys.executable, __file__, "--child", "--workload", w, "--runs", str(runs),
                  "--warmup", str(warmup), "--seq-len", str(seq)]
        m, p = [], []
        for r in range(rounds):
            if r % 2 == 0:
                m.append(run_child(ours))
                p.append(run_child(theirs))
            else:
                p.append(run_child(theirs))
                m.append(run_child(ours))
        med = lambda rs: [statistics.median(x["seconds"]) for x in rs]
        mm, pm = med(m), med(p)
        ratios = [a / b for a, b in zip(mm, pm)]
        mrss = max(x["peak_rss_mib"] for x in m)
        prss = max(x["peak_rss_mib"] for x in p)
        print(f"| {WORKLOADS[w]} | {statistics.median(mm):.3f} | {statistics.median(pm):.3f} "
              f"| {statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)}) "
              f"| {mrss:.0f} | {prss:.0f} | {mrss / prss:.2f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", action="append", choices=list(WORKLOADS))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--side-by-side", metavar="BINARY",
                    help="alternate with this metapeft binary and print ratios")
    ap.add_argument("--rounds", type=int, default=3, help="side-by-side rounds per workload")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.workload[0], a.runs, a.warmup, a.seq_len)
        return
    if a.side_by_side:
        side_by_side(a.side_by_side, a.workload or list(WORKLOADS), a.rounds, a.runs, a.warmup,
                     a.seq_len)
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

#!/usr/bin/env python3
"""Reference fixtures for all-MiniLM-L6-v2 sentence embeddings.

sentence-transformers recipe done by hand with transformers.AutoModel:
tokenize ([CLS] ... [SEP], truncate to max_seq_length), run BERT, mean-pool
the last hidden state over the attention mask, L2-normalise. Each sentence
is encoded on its own (no padding). Writes tests/fixtures/minilm_embeddings.json.

Usage:
    python minilm_embed.py /path/to/all-MiniLM-L6-v2/model \
        [--out tests/fixtures/minilm_embeddings.json] [--check-st]
"""

import argparse
import json
import os

import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModel, AutoTokenizer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

LONG = " ".join([
    "The old lighthouse keeper climbed the spiral staircase every evening, counting",
    "all one hundred and twelve steps while the wind rattled the salt-crusted windows.",
    "He trimmed the wick, polished the enormous Fresnel lens, and wrote careful notes",
    "about the weather, the passing ships, and the migrating seabirds in a leather",
    "notebook that his grandmother had given him decades earlier. Visitors sometimes",
    "asked whether the job felt lonely, but he insisted that the sea was never quiet",
    "enough for loneliness: there were storms to watch, fishermen to wave at, and",
    "constellations wheeling slowly above the harbour. In winter the ice formed",
    "strange sculptures along the breakwater, and in summer children from the village",
    "came to hunt for crabs among the rocks below. When the coastguard finally",
    "installed an automated beacon, the keeper was offered a comfortable pension and",
    "a cottage inland, far from the noise of the waves. He declined politely, moved",
    "his books into the small storeroom at the base of the tower, and continued",
    "writing his observations every night, convinced that someone, someday, would want",
    "to know exactly how the light had looked on the water during the great storm of",
    "nineteen eighty-seven, or how many gannets had nested on the northern cliffs",
    "during that unusually warm and windless spring. Years later, a young historian",
    "discovered the notebooks, transcribed them patiently, and published a remarkable",
    "chronicle of coastal life that became an unexpected bestseller across the country.",
])

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market crashed today.",
    "",
    LONG,
]


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@torch.inference_mode()
def embed(model, ids):
    x = torch.tensor([ids], dtype=torch.long)
    mask = torch.ones_like(x)
    h = model(input_ids=x, attention_mask=mask, token_type_ids=torch.zeros_like(x)).last_hidden_state
    pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", help="directory with config.json, model.safetensors, tokenizer.json")
    ap.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/minilm_embeddings.json"))
    ap.add_argument("--check-st", action="store_true",
                    help="also compare against sentence_transformers.SentenceTransformer.encode")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(2)
    d = args.model_dir
    st_cfg_path = os.path.join(d, "sentence_bert_config.json")
    max_len = read_json(st_cfg_path)["max_seq_length"] if os.path.exists(st_cfg_path) else 256
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModel.from_pretrained(d, dtype=torch.float32).eval()
    raw = read_json(os.path.join(d, "tokenizer.json"))

    entries, embs = [], []
    for s in SENTENCES:
        full = tok(s, add_special_tokens=True, truncation=False)["input_ids"]
        ids = tok(s, add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
        e = embed(model, ids)
        embs.append(e)
        entries.append({
            "text": s,
            "n_tokens_untruncated": len(full),
            "ids": ids,
            "embedding_head": [float(v) for v in e[:8]],
            "embedding": [float(v) for v in e],
        })

    # Long sentence truncated at 128 (what tokenizer.json's own truncation does).
    ids128 = tok(LONG, add_special_tokens=True, truncation=True, max_length=128)["input_ids"]
    e128 = embed(model, ids128)
    raw_tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    raw_enc = raw_tok.encode(LONG)
    assert raw_enc.ids == ids128, "tokenizer.json truncation differs from HF max_length=128"
    raw_short = raw_tok.encode(SENTENCES[0])

    cos = [[float(torch.dot(a, b)) for b in embs] for a in embs]
    c01 = cos[0][1]
    print(f"cos(s0, s1) = {c01:.6f} (expected ~0.7553)")
    for i, row in enumerate(cos):
        print(i, " ".join(f"{v:+.4f}" for v in row))
    print("long: untruncated", entries[4]["n_tokens_untruncated"], "tokens; cos(trunc256, trunc128) =",
          f"{float(torch.dot(embs[4], e128)):.6f}")

    if args.check_st:
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(d, device="cpu")
        ref = st.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True, batch_size=1)
        diff = max(float((ref[i] - embs[i]).abs().max()) for i in range(len(SENTENCES)))
        print(f"sentence-transformers {st.max_seq_length=} max |diff| = {diff:.3e}")

    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "recipe": "ids = [CLS] wordpieces [SEP] truncated to max_seq_length; mean-pool last_hidden_state "
                  "over attention mask (single sentence, no padding); L2 normalise",
        "max_seq_length": max_len,
        "hf_tokenizer_model_max_length": tok.model_max_length,
        "tokenizer_json_truncation": raw.get("truncation"),
        "tokenizer_json_padding": raw.get("padding"),
        "tokenizer_json_note": "tokenizers.Tokenizer.from_file applies these (truncate AND pad to 128, pad id 0, "
                               "attention_mask 0 on pads); transformers disables them; sentence-transformers "
                               "truncates at max_seq_length.",
        "raw_tokenizer_json_example": {"text": SENTENCES[0], "ids": raw_short.ids,
                                       "attention_mask": raw_short.attention_mask},
        "cases": entries,
        "cosines": cos,
        "long_truncated_128": {
            "ids": ids128,
            "embedding_head": [float(v) for v in e128[:8]],
            "cos_with_truncated_max_seq_length": float(torch.dot(embs[4], e128)),
        },
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()

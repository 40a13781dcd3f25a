#!/usr/bin/env python3
"""Reference values for the evaluation metrics, computed with the official Python packages.

Sections of the output JSON:

* ``rouge``: Google ``rouge-score`` (``RougeScorer(["rouge1", "rouge2", "rougeL",
  "rougeLsum"], use_stemmer=True)``) on (prediction, reference) pairs, the tokens
  its tokenizer produces, the corpus mean of each F1, and ``stems``: the Porter
  stemmer rouge-score uses (nltk ``PorterStemmer()``, default NLTK_EXTENSIONS
  mode) applied to a word list covering the Porter rules.
* ``bleu``: ``sacrebleu.corpus_bleu`` / ``sentence_bleu`` with defaults (13a
  tokenizer, exp smoothing) and the 13a tokenization of tricky strings.
* ``seqeval``: entity-level P/R/F1 (default conlleval-compatible mode and
  ``mode="strict", scheme=IOB2``), token accuracy, classification reports and
  the extracted entity spans.
* ``ood``: AUROC, AUPR and FPR at 95 % TPR (in-distribution = positive class,
  higher score = more in-distribution), plus MSP and energy scores of a
  fixed logits matrix.
* ``classification``: accuracy and macro-F1 (scikit-learn).
* ``perplexity``: token-weighted perplexity, exp(-sum(logp) / sum(n)).

Nothing here is random except the OOD score sets, which come from
``numpy.random.default_rng`` with fixed seeds and are rounded to 6 decimals
before use; the rounded inputs are stored in the JSON. Reruns give
byte-identical output.

Usage:
    python scripts/reference/metrics_fixtures.py [--out tests/fixtures/metrics.json]
"""

import argparse
import importlib.metadata as md
import json
import math
import os
import platform
import warnings

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "metrics.json")


def fl(x):
    """Plain Python float (JSON-serialisable, numpy scalars included)."""
    return float(x)


def nan_to_null(obj):
    """Replace NaN floats by None (JSON null); seqeval returns NaN for a macro
    average over zero entity types."""
    if isinstance(obj, dict):
        return {k: nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_to_null(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def capture(fn, *args, **kwargs):
    """Call fn, returning (result, sorted unique warning texts)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    msgs = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return result, msgs


# ---------------------------------------------------------------------------
# ROUGE
# ---------------------------------------------------------------------------

ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]

# (name, prediction, reference)
ROUGE_PAIRS = [
    ("identical", "the cat sat on the mat", "the cat sat on the mat"),
    ("classic_example", "The quick brown dog jumps on the log.",
     "The quick brown fox jumps over the lazy dog"),
    ("plurals_and_ing", "The cats are running quickly across the gardens",
     "a cat runs quick across a garden"),
    ("ed_and_ing", "she walked and talked while hopping and tanned",
     "walking talking hopped tanning"),
    ("ational_ization", "relational organization of conditional nationalization",
     "relate organize conditioning nationalize"),
    ("short_words_not_stemmed", "this was his bus and its gas does",
     "thi wa hi bu and it ga doe"),
    ("punctuation", "Hello, world! It's a U.S.A.-based e-mail: test@example.com (really?)",
     "hello world it s usa based email test example com really"),
    ("non_ascii", "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 Z\u00fcrich \u6771\u4eac Stra\u00dfe",
     "caf na ve r sum z rich stra e"),
    ("unicode_lowercase_quirks",
     "\u0130stanbul \u212aelvin \ufb01ne \uff11\uff12\uff13 x\u00b2 \u03a3igma",
     "i stanbul kelvin ne x igma"),
    ("numbers", "In 2023, revenue rose 15.5% to $3.2 billion, as in the 1990s.",
     "revenue rose 15 5 percent to 3 2 billion in 1990s 2023"),
    ("repeated_words", "the the the the cat", "the cat the cat"),
    ("repeated_bigrams", "a b a b a b", "a b a b"),
    ("empty_prediction", "", "the cat sat"),
    ("empty_reference", "the cat sat", ""),
    ("both_empty", "", ""),
    ("punctuation_only_prediction", "!!! ... ??? -- \u2014", "something happened"),
    ("single_token", "a", "a"),
    ("case_insensitive", "THE CAT SAT", "the cat sat"),
    ("pool_irregular_forms", "dying lying tying news innings outings proceed",
     "die lie tie news inning outing proceeding"),
    ("stem_collisions", "generously generous generate general",
     "generation generic gener genera"),
    ("hyphen_apostrophe", "state-of-the-art models don't fail", "state of the art model don t fails"),
    ("whitespace", "  the\tcat   sat \u00a0on  ", "the cat sat on"),
    ("multi_sentence", "the cat sat on the mat.\nthe dog barked loudly.",
     "the dog barked.\nthe cat was sitting on the mat."),
    ("multi_sentence_reordered",
     "police arrested the suspect on monday.\nthe victim was taken to hospital.\nno charges yet.",
     "the victim was taken to a local hospital.\npolice arrested a suspect monday night."),
    ("lsum_blank_and_punct_lines", "\nfirst point here\n\n...\nsecond point\n",
     "first point\n\nsecond point here\n"),
    ("lsum_crlf", "first line\r\nsecond line", "first line\nsecond line"),
    ("lsum_backtrack_match_last", "cat\ndog cat", "cat dog cat"),
    ("lsum_backtrack_tie_moves_up", "beta alpha\nbeta", "alpha beta"),
    ("long_summary",
     "The government announced new measures on Tuesday to curb rising energy prices. "
     "Households will receive a one-off payment of 400 pounds.\n"
     "Critics said the support was insufficient.",
     "New measures to tackle soaring energy costs were unveiled by the government on Tuesday.\n"
     "Every household is set to get a 400-pound payment, "
     "though opposition critics called the package insufficient."),
]

STEM_WORDS = [
    # Porter (1980) examples, step 1a .. 5b
    "caresses", "ponies", "ties", "caress", "cats",
    "feed", "agreed", "plastered", "bled", "motoring", "sing",
    "conflated", "troubled", "sized", "hopping", "tanned", "falling", "hissing",
    "fizzed", "failing", "filing",
    "happy", "sky",
    "relational", "conditional", "rational", "valenci", "hesitanci", "digitizer",
    "conformabli", "radicalli", "differentli", "vileli", "analogousli",
    "vietnamization", "predication", "operator", "feudalism", "decisiveness",
    "hopefulness", "callousness", "formaliti", "sensitiviti", "sensibiliti",
    "triplicate", "formative", "formalize", "electriciti", "electrical", "hopeful",
    "goodness",
    "revival", "allowance", "inference", "airliner", "gyroscopic", "adjustable",
    "defensible", "irritant", "replacement", "adjustment", "dependent", "adoption",
    "homologou", "communism", "activate", "angulariti", "homologous", "effective",
    "bowdlerize",
    "probate", "rate", "cease", "controll", "roll",
    # measure examples from the paper
    "tr", "ee", "tree", "y", "by", "trouble", "oats", "trees", "ivy",
    "troubles", "private", "oaten", "orrery",
    # NLTK irregular-form pool and NLTK extensions
    "generously", "dying", "lying", "tying", "news", "innings", "inning",
    "outings", "outing", "canning", "cannings", "howe", "herrings", "earring",
    "proceed", "exceed", "succeed", "skies", "flies", "dies", "spied", "died",
    "tried", "cries", "spy", "fly", "try", "enjoy", "enjoyment", "fully",
    "hopefully", "geology", "theology", "archaeology", "analogy", "logic",
    # y handling
    "syzygy", "toy", "toys", "yyyy", "saying", "played", "yesterday", "crying",
    # common words
    "the", "was", "has", "this", "his", "does", "goes", "going", "is", "as",
    "running", "runs", "ran", "quickly", "happiness", "happily", "university",
    "universe", "universal", "organization", "organize", "organs", "national",
    "nation", "nationality", "connection", "connected", "connecting",
    "connections", "connective", "probability", "probably", "abilities", "ability",
    "meeting", "meetings", "studies", "studying", "studied", "student",
    "summarization", "summarize", "summary", "summaries", "evaluation",
    "evaluating", "generation", "generate", "general", "generic", "models",
    "modeling", "modelling", "language", "languages", "translated", "translation",
    "references", "referencing", "argued", "arguing", "argument", "agreement",
    "sensational", "traditional", "misunderstood", "mysterious", "corpora",
    "corpus", "1990s", "2023", "abc123", "Running", "CATS",
]


def rouge_section():
    from rouge_score import rouge_scorer, tokenize, tokenizers

    scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=True)
    tok = tokenizers.DefaultTokenizer(use_stemmer=True)
    stemmer = tok._stemmer
    assert type(stemmer).__module__ == "nltk.stem.porter", type(stemmer)
    assert stemmer.mode == stemmer.NLTK_EXTENSIONS, stemmer.mode

    cases = []
    sums = {t: {"precision": 0.0, "recall": 0.0, "fmeasure": 0.0} for t in ROUGE_TYPES}
    for name, pred, ref in ROUGE_PAIRS:
        scores = scorer.score(ref, pred)  # score(target, prediction)
        assert tok.tokenize(pred) == scorer._tokenizer.tokenize(pred)
        case = {
            "name": name,
            "prediction": pred,
            "reference": ref,
            "prediction_tokens": tok.tokenize(pred),
            "reference_tokens": tok.tokenize(ref),
            "prediction_lsum_sentences": [tok.tokenize(s) for s in pred.split("\n") if s],
            "reference_lsum_sentences": [tok.tokenize(s) for s in ref.split("\n") if s],
        }
        for t in ROUGE_TYPES:
            s = scores[t]
            case[t] = {"precision": fl(s.precision), "recall": fl(s.recall),
                       "fmeasure": fl(s.fmeasure)}
            for k in ("precision", "recall", "fmeasure"):
                sums[t][k] += fl(getattr(s, k))
        cases.append(case)

    stems = {w: stemmer.stem(w) for w in STEM_WORDS}
    # What rouge-score's tokenizer makes of each word on its own (words of
    # length <= 3 are not stemmed; upper case is lowered first).
    rouge_word_tokens = {w: tok.tokenize(w) for w in STEM_WORDS}

    return {
        "rouge_types": ROUGE_TYPES,
        "use_stemmer": True,
        "call": "RougeScorer(rouge_types, use_stemmer=True).score(reference, prediction)",
        "tokenizer": {
            "lowercase": "str.lower() (full Unicode lowercasing) first",
            "non_alnum_regex": tokenize.NON_ALPHANUM_PATTERN,
            "non_alnum_replacement": " ",
            "split_regex": tokenize.SPACES_PATTERN,
            "stem_only_if_len_gt": 3,
            "valid_token_regex": tokenize.VALID_TOKEN_PATTERN,
            "stemmer": "nltk.stem.porter.PorterStemmer() (mode NLTK_EXTENSIONS)",
        },
        "lsum_sentence_split": "text.split('\\n'), dropping empty strings (split_summaries=False)",
        "cases": cases,
        "corpus_mean_fmeasure": {t: sums[t]["fmeasure"] / len(ROUGE_PAIRS) for t in ROUGE_TYPES},
        "corpus_mean": {t: {k: v / len(ROUGE_PAIRS) for k, v in sums[t].items()}
                        for t in ROUGE_TYPES},
        "n_cases": len(ROUGE_PAIRS),
        "stems": stems,
        "word_tokens": rouge_word_tokens,
    }


# ---------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------

BLEU_CORPORA = [
    {
        "name": "single_ref",
        "hyps": [
            "The cat sat on the mat.",
            "It is a guide to action which ensures that the military always obeys the commands of the party.",
            "He read the book because he was interested in world history.",
            "the the the the the the the",
        ],
        "refs": [[
            "The cat is sitting on the mat.",
            "It is a guide to action that ensures that the military will forever heed Party commands.",
            "He was interested in world history because he read the book.",
            "The cat is on the mat.",
        ]],
    },
    {
        "name": "two_refs",
        "hyps": [
            "The cat sat on the mat.",
            "It is the guiding principle which guarantees the military forces always being under the command of the Party.",
            "A quick brown fox jumps over the dog",
        ],
        "refs": [
            [
                "The cat is sitting on the mat.",
                "It is a guide to action that ensures that the military will forever heed Party commands.",
                "The quick brown fox jumps over the lazy dog.",
            ],
            [
                "There is a cat on the mat.",
                "It is the guiding principle which guarantees the military forces always being under the command of the Party.",
                "A fast brown fox leaps over a lazy dog",
            ],
        ],
    },
    {
        "name": "empty_hyp_unicode_punct",
        "hyps": [
            "Hello, world!",
            "",
            "It's only $5.00, e.g. in the U.S.A.",
            "Caf\u00e9 \u00ab na\u00efve \u00bb \u2014 \u201cquoted\u201d text\u2026",
            "Numbers: 3,000 and 1-2 and 4.5%",
        ],
        "refs": [[
            "Hello world!",
            "Nothing was said.",
            "It's just $5.00, e.g. in the U.S.A.",
            "Caf\u00e9 \u00ab na\u00efve \u00bb \u2014 \u201cquoted\u201d text\u2026",
            "Numbers: 3,000 and 1 - 2 and 4.5 %",
        ]],
    },
]

SENTENCE_BLEU = [
    ("identical", "The quick brown fox jumps over the lazy dog.",
     ["The quick brown fox jumps over the lazy dog."]),
    ("partial", "The quick brown fox jumped over a lazy dog.",
     ["The quick brown fox jumps over the lazy dog."]),
    ("no_trigram_match", "dog lazy the over jumps fox",
     ["The quick brown fox jumps over the lazy dog."]),
    ("short_hyp", "the cat", ["the cat is on the mat"]),
    ("no_match", "completely different words", ["the cat is on the mat"]),
    ("empty_hyp", "", ["the cat is on the mat"]),
    ("two_refs", "It's $5.00, e.g. cheap.", ["It's $5.00, e.g. cheap!", "It is 5 dollars, cheap."]),
]

TOK13A_STRINGS = [
    "Hello, world!",
    "It's a U.S.A. thing.",
    "$5.00 e.g. 3,000 and 1,000.50.",
    "1-2 2-3 a-b e-mail x-1",
    "&quot;quoted&quot; &amp; &lt;tag&gt; &apos;",
    "line one-\nline two\nthree-\n",
    "<skipped> text <skipped>",
    "\u00dcn\u00efc\u00f6d\u00e9 \u2014 \u201cquotes\u201d \u2018single\u2019 \u2026 \u6771\u4eac\u3002",
    "a.b.c end. x,y 10.5,20 3.14. ... ,,",
    "(parens) [brackets] {braces} <angle>",
    "@user #tag ~tilde ^caret `tick` _under_ |pipe| back\\slash",
    "C++ / C# 50% a+b=c; x:y? \"dq\"",
    "  leading and   trailing  \t tabs ",
    "non\u00a0breaking and\u2003em space",
    "unit\x1fsep group\x1dsep",
    "zero\u200bwidth",
    "Mr. Smith's 2nd-place finish (3.5 pts).",
    "",
    "pi is 3.14.",
]


def bleu_section():
    import sacrebleu
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()

    def score_dict(s):
        return {
            "score": fl(s.score),
            "counts": [int(c) for c in s.counts],
            "totals": [int(t) for t in s.totals],
            "precisions": [fl(p) for p in s.precisions],
            "bp": fl(s.bp),
            "sys_len": int(s.sys_len),
            "ref_len": int(s.ref_len),
            "str": str(s),
        }

    corpora = []
    for c in BLEU_CORPORA:
        s, warns = capture(sacrebleu.corpus_bleu, c["hyps"], c["refs"])
        corpora.append({
            "name": c["name"],
            "hyps": c["hyps"],
            "refs": c["refs"],
            "hyps_tok": [tok(h.rstrip()) for h in c["hyps"]],
            "refs_tok": [[tok(r.rstrip()) for r in stream] for stream in c["refs"]],
            **score_dict(s),
            "warnings": warns,
        })

    sentences = []
    for name, hyp, refs in SENTENCE_BLEU:
        s, warns = capture(sacrebleu.sentence_bleu, hyp, refs)
        sentences.append({"name": name, "hyp": hyp, "refs": refs, **score_dict(s),
                          "warnings": warns})
        # same sentence through corpus_bleu (no effective order) for contrast
        sc = sacrebleu.corpus_bleu([hyp], [[r] for r in refs])
        sentences[-1]["corpus_bleu_same_pair_score"] = fl(sc.score)

    tokenization = [{"input": s, "tok_13a": tok(s), "tok_13a_after_rstrip": tok(s.rstrip())}
                    for s in TOK13A_STRINGS]

    return {
        "defaults": {
            "corpus_bleu": "tokenize='13a', smooth_method='exp', lowercase=False, "
                           "use_effective_order=False, max_ngram_order=4",
            "sentence_bleu": "as corpus_bleu but use_effective_order=True",
            "preprocess": "each segment is rstrip()ed, then tokenized with 13a; "
                          "n-grams are taken from str.split() of the tokenized line",
        },
        "corpora": corpora,
        "sentences": sentences,
        "tokenization_13a": tokenization,
    }


# ---------------------------------------------------------------------------
# seqeval
# ---------------------------------------------------------------------------

# (name, y_true sequence, y_pred sequence); all IOB1/IOB2 tags so that the
# whole corpus can also be scored with mode="strict", scheme=IOB2.
SEQEVAL_PAIRS = [
    ("exact_match", ["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC"]),
    ("i_without_b", ["O", "I-PER", "I-PER", "O", "B-ORG"], ["O", "B-PER", "I-PER", "O", "B-ORG"]),
    ("type_change_mid_entity", ["B-PER", "I-PER", "O"], ["B-PER", "I-ORG", "O"]),
    ("o_only", ["O", "O", "O"], ["O", "O", "O"]),
    ("entity_at_end", ["O", "B-MISC", "I-MISC"], ["O", "B-MISC", "O"]),
    ("false_positive", ["O", "O"], ["B-PER", "O"]),
    ("missed_entity", ["B-LOC", "I-LOC"], ["O", "O"]),
    ("adjacent_entities", ["B-PER", "B-PER", "I-PER"], ["B-PER", "I-PER", "I-PER"]),
    ("i_type_change_at_end", ["B-ORG", "I-ORG", "I-ORG"], ["B-ORG", "I-ORG", "I-LOC"]),
    ("i_after_o_same_type", ["B-LOC", "O", "I-LOC", "O"], ["B-LOC", "O", "B-LOC", "O"]),
    ("single_token_entities", ["B-PER"], ["I-PER"]),
]

# IOBES tags, evaluated in default mode (accepted) and strict mode.
SEQEVAL_IOBES_PAIRS = [
    ("iobes_match", ["S-PER", "O", "B-LOC", "E-LOC"], ["S-PER", "O", "B-LOC", "E-LOC"]),
    ("iobes_mixed", ["B-ORG", "I-ORG", "E-ORG", "O", "S-MISC"],
     ["B-ORG", "E-ORG", "E-ORG", "O", "B-MISC"]),
    ("e_and_s_boundaries", ["E-PER", "E-PER", "S-PER", "I-PER"],
     ["B-PER", "E-PER", "S-PER", "S-PER"]),
]

# Extra tag sequences, entity extraction only.
SEQEVAL_ENTITY_ONLY = [
    ["B", "I", "O", "I"],
    ["PER", "O", "B-PER"],
    ["B-PER-X", "I-PER-X", "I-PER"],
    ["I-PER", "B-PER", "I-PER"],
    ["E-PER", "E-PER", "I-PER"],
    ["S-PER", "I-PER", "E-PER"],
    ["B-PER", "E-PER", "B-PER", "S-PER"],
    ["O", "B-LOC", "I-PER", "I-PER", "O"],
    [],
]


def seqeval_section():
    import seqeval
    from seqeval.metrics import (accuracy_score, classification_report, f1_score,
                                 precision_score, recall_score)
    from seqeval.metrics.sequence_labeling import get_entities
    from seqeval.scheme import IOB2, IOBES, Entities

    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (np.integer,)):
            return int(obj)
        if isinstance(obj, (np.floating, float)):
            return fl(obj)
        return obj

    def strict_entities(seq, scheme):
        try:
            ents = Entities([seq], scheme).entities[0]
            return [[e.tag, e.start, e.end - 1] for e in ents]
        except Exception as e:  # noqa: BLE001 - record the error text
            return {"error": f"{type(e).__name__}: {e}"}

    def evaluate(y_true, y_pred, **kw):
        """Scores plus, per call, the warnings that call raised."""
        out = {}
        warns = {}
        calls = (("precision", precision_score, {}), ("recall", recall_score, {}),
                 ("f1", f1_score, {}), ("f1_macro", f1_score, {"average": "macro"}),
                 ("f1_weighted", f1_score, {"average": "weighted"}))
        for key, fn, extra_kw in calls:
            try:
                v, w = capture(fn, y_true, y_pred, **extra_kw, **kw)
                out[key] = fl(v)
                warns[key] = w
            except Exception as e:  # noqa: BLE001 - record the error text
                out[key] = {"error": f"{type(e).__name__}: {e}"}
        try:
            rep, w = capture(classification_report, y_true, y_pred, output_dict=True, **kw)
            out["report"] = clean(rep)
            warns["report"] = w
        except Exception as e:  # noqa: BLE001
            out["report"] = {"error": f"{type(e).__name__}: {e}"}
        out["warnings"] = {k: v for k, v in warns.items() if v}
        return out

    def corpus_block(pairs, strict_scheme, strict_name):
        y_true = [t for _, t, _ in pairs]
        y_pred = [p for _, _, p in pairs]
        cases = []
        for name, t, p in pairs:
            ents_t, wt = capture(get_entities, t)
            ents_p, wp = capture(get_entities, p)
            cases.append({
                "name": name,
                "y_true": t,
                "y_pred": p,
                "entities_true": [list(e) for e in ents_t],
                "entities_pred": [list(e) for e in ents_p],
                "entities_true_strict": strict_entities(t, strict_scheme),
                "entities_pred_strict": strict_entities(p, strict_scheme),
                "entities_strict_iob2_true": strict_entities(t, IOB2),
                "entities_strict_iob2_pred": strict_entities(p, IOB2),
                "get_entities_warnings": sorted(set(wt + wp)),
                "default": evaluate([t], [p]),
                "strict": evaluate([t], [p], mode="strict", scheme=strict_scheme),
            })
        return {
            "strict_scheme": strict_name,
            "cases": cases,
            "corpus": {
                "accuracy": fl(accuracy_score(y_true, y_pred)),
                "default": evaluate(y_true, y_pred),
                "strict": evaluate(y_true, y_pred, mode="strict", scheme=strict_scheme),
                "strict_iob2": evaluate(y_true, y_pred, mode="strict", scheme=IOB2),
                # f1_score(mode="strict") without a scheme silently falls back to
                # the default mode (sequence_labeling.py: `if mode == 'strict' and scheme`)
                "f1_strict_without_scheme": fl(capture(f1_score, y_true, y_pred,
                                                       mode="strict")[0]),
            },
        }

    extra = []
    for seq in SEQEVAL_ENTITY_ONLY:
        ents, w = capture(get_entities, seq)
        extra.append({
            "seq": seq,
            "entities": [list(e) for e in ents],
            "warnings": w,
            "entities_strict_iob2": strict_entities(seq, IOB2),
            "entities_strict_iobes": strict_entities(seq, IOBES),
        })
    # A corpus (list of sentences) is flattened with an "O" between sentences,
    # so spans use global offsets and never cross sentence boundaries.
    nested, _ = capture(get_entities, [["B-PER", "I-PER"], ["I-PER", "O", "B-LOC"]])

    return {
        "version": md.version("seqeval"),
        "span_convention": "[type, start, end] with end inclusive (token indices)",
        "iob": corpus_block(SEQEVAL_PAIRS, IOB2, "IOB2"),
        "iobes": corpus_block(SEQEVAL_IOBES_PAIRS, IOBES, "IOBES"),
        "entity_extraction": extra,
        "nested_get_entities": {
            "input": [["B-PER", "I-PER"], ["I-PER", "O", "B-LOC"]],
            "entities": [list(e) for e in nested],
        },
    }


# ---------------------------------------------------------------------------
# OOD detection
# ---------------------------------------------------------------------------

def fpr_at_tpr(id_scores, ood_scores, tpr_level=0.95, drop_intermediate=False):
    """FPR at the first ROC point whose TPR >= tpr_level (ID = positive)."""
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    s = np.r_[id_scores, ood_scores]
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=drop_intermediate)
    i = int(np.argmax(tpr >= tpr_level))
    return fl(fpr[i]), fl(thr[i]), fl(tpr[i])


def fpr_closest_recall(id_scores, ood_scores, recall_level=0.95):
    """Variant used by several OOD code bases (e.g. fpr_and_fdr_at_recall in
    the outlier-exposure / energy_ood utils/display_results.py): among the
    distinct thresholds from the highest down to the first one that keeps all
    ID samples, take the one whose ID recall is closest to recall_level
    (floating-point |recall - level|; on a tie, the lower threshold). Recorded
    only for contrast: it may pick a recall below 0.95."""
    id_s = np.asarray(id_scores)
    ood_s = np.asarray(ood_scores)
    best = None
    for t in np.unique(np.r_[id_s, ood_s])[::-1]:
        rec = np.mean(id_s >= t)
        d = abs(rec - recall_level)
        if best is None or d <= best[0]:
            best = (d, t, rec, np.mean(ood_s >= t))
        if rec == 1.0:
            break
    return fl(best[3]), fl(best[1]), fl(best[2])


def auroc_pairs(id_s, ood_s):
    """Mann-Whitney form: P(id > ood) + 0.5 P(id == ood)."""
    gt = (id_s[:, None] > ood_s[None, :]).sum()
    eq = (id_s[:, None] == ood_s[None, :]).sum()
    return (gt + 0.5 * eq) / (len(id_s) * len(ood_s))


def average_precision_steps(pos, neg):
    """sum over distinct thresholds t (descending) of (R(t) - R(t_prev)) * P(t),
    with P(t), R(t) for the rule score >= t (no interpolation)."""
    ap, prev_r = 0.0, 0.0
    for t in np.unique(np.r_[pos, neg])[::-1]:
        tp = np.sum(pos >= t)
        fp = np.sum(neg >= t)
        r = tp / len(pos)
        ap += (r - prev_r) * (tp / (tp + fp))
        prev_r = r
    return ap


def ood_metrics(id_scores, ood_scores):
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    s = np.r_[id_scores, ood_scores]
    fpr, thr, tpr = fpr_at_tpr(id_scores, ood_scores)
    fpr_d, _, _ = fpr_at_tpr(id_scores, ood_scores, drop_intermediate=True)
    fpr_c, thr_c, rec_c = fpr_closest_recall(id_scores, ood_scores)
    ids = np.asarray(id_scores)
    oods = np.asarray(ood_scores)
    # brute-force check of the definition
    t_star = max(t for t in np.unique(ids) if np.sum(ids >= t) * 20 >= 19 * len(ids))
    assert t_star == thr and fpr == fl(np.mean(oods >= t_star)), (t_star, thr)
    assert abs(auroc_pairs(ids, oods) - roc_auc_score(y, s)) < 1e-12
    assert abs(average_precision_steps(ids, oods) - average_precision_score(y, s)) < 1e-12
    assert abs(average_precision_steps(-oods, -ids) - average_precision_score(1 - y, -s)) < 1e-12
    return {
        "auroc": fl(roc_auc_score(y, s)),
        "aupr_in": fl(average_precision_score(y, s)),
        "aupr_out": fl(average_precision_score(1 - y, -s)),
        "fpr95": fpr,
        "fpr95_threshold": thr,
        "fpr95_tpr_at_threshold": tpr,
        "fpr95_roc_curve_drop_intermediate_true": fpr_d,
        "fpr95_closest_recall_variant": fpr_c,
        "fpr95_closest_recall_variant_threshold": thr_c,
        "fpr95_closest_recall_variant_recall": rec_c,
    }


def ood_section():
    rng = np.random.default_rng(20240601)
    normal_id = np.round(rng.normal(1.0, 1.0, 200), 6)
    normal_ood = np.round(rng.normal(0.0, 1.0, 150), 6)
    rng = np.random.default_rng(7)
    ties_id = rng.integers(2, 7, 40).astype(float)
    ties_ood = rng.integers(0, 5, 60).astype(float)
    sep_id = np.array([0.99, 0.97, 0.95, 0.93, 0.9, 0.88, 0.85, 0.83, 0.8, 0.78,
                       0.76, 0.75, 0.74, 0.72, 0.7, 0.69, 0.68, 0.66, 0.65, 0.61])
    sep_ood = np.array([0.6, 0.5, 0.45, 0.4, 0.31, 0.3, 0.2, 0.1, 0.05, 0.0])
    # ID recall can hit 0.95 only approximately (n_id = 30): the first TPR >= 0.95
    # is 29/30; the closest-recall variant may choose differently.
    rng = np.random.default_rng(11)
    odd_id = np.round(rng.normal(0.5, 1.0, 30), 6)
    odd_ood = np.round(rng.normal(0.0, 1.0, 25), 6)

    # Every threshold adds one ID and one OOD sample: all ROC points are
    # collinear, so roc_curve's default drop_intermediate=True keeps only
    # (0, 0) and (1, 1) and "first TPR >= 0.95" would give 1.0 instead of 0.95.
    diag = np.arange(1.0, 21.0)

    sets = []
    for name, a, b in (("normal_shift", normal_id, normal_ood),
                       ("many_ties", ties_id, ties_ood),
                       ("perfectly_separated", sep_id, sep_ood),
                       ("n_id_30", odd_id, odd_ood),
                       ("diagonal_ties", diag, diag.copy())):
        sets.append({"name": name, "id_scores": [fl(x) for x in a],
                     "ood_scores": [fl(x) for x in b], **ood_metrics(a, b)})

    logits = np.array([
        [2.0, 1.0, 0.1, -1.0],
        [0.0, 0.0, 0.0, 0.0],
        [10.0, -10.0, 3.5, 0.25],
        [1000.0, 999.0, 0.0, -1000.0],
        [-5.0, -5.5, -6.0, -4.75],
        [0.3, 0.3, 0.2, 0.1],
    ])

    def logsumexp(row):
        m = np.max(row)
        return m + math.log(np.sum(np.exp(row - m)))

    def msp(row):
        e = np.exp(row - np.max(row))
        return fl(np.max(e / e.sum()))

    rows = []
    for r in logits:
        rows.append({
            "logits": [fl(x) for x in r],
            "msp": msp(r),
            "energy_score_T1": fl(1.0 * logsumexp(r / 1.0)),
            "energy_score_T2": fl(2.0 * logsumexp(r / 2.0)),
            "energy_T1": fl(-1.0 * logsumexp(r / 1.0)),
        })
    # cross-check logsumexp against scipy if available
    try:
        from scipy.special import logsumexp as sls, softmax

        for row in rows:
            r = np.array(row["logits"])
            assert abs(fl(sls(r)) - row["energy_score_T1"]) < 1e-9
            assert abs(fl(np.max(softmax(r))) - row["msp"]) < 1e-12
    except ImportError:
        pass

    return {
        "convention": {
            "positive_class": "in-distribution (label 1)",
            "score_direction": "higher score = more in-distribution",
            "auroc": "sklearn.metrics.roc_auc_score(y, s), y=1 for ID",
            "auroc_equivalent": "P(s_id > s_ood) + 0.5 * P(s_id == s_ood) over all pairs",
            "aupr_in": "sklearn.metrics.average_precision_score(y, s) (ID positive): "
                       "sum over distinct thresholds t, descending, of "
                       "(R(t) - R(previous t)) * P(t) for the rule s >= t; no interpolation",
            "aupr_out": "average_precision_score(1 - y, -s) (OOD positive, negated score)",
            "fpr95": "fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False); "
                     "i = first index with tpr >= 0.95; fpr95 = fpr[i]. Equivalently: "
                     "t* = largest score with #{ID >= t*} >= 0.95 * n_ID; "
                     "fpr95 = #{OOD >= t*} / n_OOD",
            "msp": "max_k softmax(logits)_k",
            "energy": "E(x) = -T * logsumexp(logits / T); the OOD score is the negative "
                      "energy, T * logsumexp(logits / T) (higher = more ID); T = 1",
        },
        "score_sets": sets,
        "logits_scores": rows,
    }


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------

CLASSIFICATION_SETS = [
    ("ints_all_labels_seen", [0, 1, 2, 2, 1, 0, 2, 1], [0, 2, 2, 2, 1, 0, 1, 1]),
    ("label_only_in_predictions", ["a", "b", "a", "b", "a"], ["a", "b", "c", "b", "b"]),
    ("label_only_in_references", ["x", "y", "z", "z", "x"], ["x", "y", "y", "y", "x"]),
]


def classification_section():
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
    from sklearn.utils.multiclass import unique_labels

    out = []
    for name, yt, yp in CLASSIFICATION_SETS:
        labels = [x.item() if hasattr(x, "item") else x for x in unique_labels(yt, yp)]
        f1m, w = capture(f1_score, yt, yp, average="macro")
        per, w2 = capture(f1_score, yt, yp, average=None)
        pm, w3 = capture(precision_score, yt, yp, average="macro")
        rm, w4 = capture(recall_score, yt, yp, average="macro")
        true_labels = sorted(set(yt))
        f1_true_only, w5 = capture(f1_score, yt, yp, average="macro", labels=true_labels)
        out.append({
            "name": name,
            "y_true": yt,
            "y_pred": yp,
            "accuracy": fl(accuracy_score(yt, yp)),
            "labels": labels,
            "f1_per_label": [fl(x) for x in per],
            "f1_macro": fl(f1m),
            "f1_macro_warnings": w,
            "precision_macro": fl(pm),
            "recall_macro": fl(rm),
            "precision_recall_macro_warnings": sorted(set(w3 + w4)),
            "f1_micro": fl(f1_score(yt, yp, average="micro")),
            "f1_weighted": fl(capture(f1_score, yt, yp, average="weighted")[0]),
            "f1_macro_over_reference_labels_only": fl(f1_true_only),
        })
        absent = labels + (["absent"] if isinstance(labels[0], str) else [max(labels) + 1])
        f1_abs, w6 = capture(f1_score, yt, yp, average="macro", labels=absent)
        out[-1]["f1_macro_with_absent_label"] = {"labels": absent, "f1_macro": fl(f1_abs),
                                                 "warnings": w6}
    return {
        "call": "sklearn.metrics.f1_score(y_true, y_pred, average='macro') "
                "(zero_division='warn' default: ill-defined terms count as 0.0 and warn)",
        "sets": out,
    }


# ---------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------

def perplexity_section():
    seqs = [
        [-0.5, -1.25, -2.0, -0.125],
        [-3.0, -0.01],
        [-0.693147, -0.693147, -0.693147, -0.693147, -0.693147, -0.693147],
        [-7.5],
    ]
    total_lp = math.fsum(math.fsum(s) for s in seqs)
    total_n = sum(len(s) for s in seqs)
    per_seq = [math.exp(-math.fsum(s) / len(s)) for s in seqs]
    return {
        "definition": "ppl = exp(-sum over all tokens of log p / total token count); "
                      "natural log",
        "sequences_logprobs": seqs,
        "lengths": [len(s) for s in seqs],
        "sum_logprob": total_lp,
        "n_tokens": total_n,
        "mean_nll": -total_lp / total_n,
        "perplexity": math.exp(-total_lp / total_n),
        "per_sequence_perplexity": per_seq,
        "mean_of_per_sequence_perplexity_NOT_the_metric": sum(per_seq) / len(per_seq),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    import absl.logging

    absl.logging.set_verbosity(absl.logging.WARNING)

    data = {
        "versions": {
            "python": platform.python_version(),
            "rouge-score": md.version("rouge-score"),
            "nltk": md.version("nltk"),
            "sacrebleu": md.version("sacrebleu"),
            "seqeval": md.version("seqeval"),
            "scikit-learn": md.version("scikit-learn"),
            "numpy": md.version("numpy"),
        },
        "rouge": rouge_section(),
        "bleu": bleu_section(),
        "seqeval": seqeval_section(),
        "ood": ood_section(),
        "classification": classification_section(),
        "perplexity": perplexity_section(),
    }
    data = nan_to_null(data)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=True, allow_nan=False)
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()

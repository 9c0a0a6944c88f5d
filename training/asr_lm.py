#!/usr/bin/env python3
"""Build a token-level n-gram language model (ARPA) for a Paraformer directory, for shallow fusion.

    /work/venv/ref/bin/python training/asr_lm.py --model models/pretrained/paraformer-tiny-en \
        [--order 6] [--min-count 1,1,1,1,2,2] [--out MODEL/ngram.arpa.gz] [--decoding 8,1.0]

The n-grams are over the model's own tokens (the words of the ARPA file are the strings of
`tokens.json`, e.g. "c@@ a@@ t"), which is what ESPnet's / FunASR's `NgramFullScorer` expects of
its `ngram_file`: at every output position the beam search adds `ngram_weight` x the LM's log10
probability of each token given the tokens before it (see `ArpaScorer` below and
`models/paraformer/src/ngram.rs`).

Text: the training-text pool of `training/data/speech.py` (Debian fortunes, WordNet examples,
number and date readings) **minus every held-out sentence** (the same hash rule the generator
uses to hold sentences out of training, so dev/test transcripts never reach the LM). The
estimate is interpolated Kneser-Ney (one discount per order, D = n1 / (n1 + 2 n2)), written in
backoff form; n-grams below the per-order `--min-count` are pruned and their mass given to the
backoff weight, which is recomputed so every context still sums to one.

Also writes `decoding.yaml` next to the ARPA file when `--decoding` is given: the beam-search
options Cadenza and `training/eval/asr_eval.py` read from a model directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def lm_texts(n_train: int = 10000, seed: int = 0) -> list[str]:
    """The speech generator's training-text pool (normalised transcripts), held-out sentences removed.

    `n_train`/`seed` must be the generator's `--n`/`--seed` (they fix its number sentences)."""
    import speech

    train, _ = speech.text_pool(np.random.default_rng(seed), n_train)
    out = [speech.normalize(s) for _, s in train]
    return [t for t in out if t]


def tokenize(texts: list[str], model_dir: Path) -> tuple[list[list[str]], list[str]]:
    """Token strings of each transcript, as the model writes them (letters or BPE pieces)."""
    from asr import text_to_ids

    tokens = json.loads((model_dir / "tokens.json").read_text())
    idx = {t: i for i, t in enumerate(tokens)}
    bpe = None
    if (model_dir / "bpe.json").exists():
        from tokenizers import Tokenizer

        bpe = Tokenizer.from_file(str(model_dir / "bpe.json"))
    return [[tokens[i] for i in text_to_ids(t, idx, bpe)] for t in texts], tokens


def build_arpa(seqs: list[list[str]], vocab: list[str], order: int, min_count: list[int]) -> str:
    """Interpolated Kneser-Ney in ARPA backoff form (log10)."""
    # counts[k][ctx][w]: raw counts for the highest order and for n-grams starting with <s>,
    # continuation counts (distinct left extensions) below it.
    raw = [defaultdict(lambda: defaultdict(int)) for _ in range(order)]
    for s in seqs:
        s = [BOS] + s + [EOS]
        for i in range(1, len(s)):
            for k in range(order):
                if i - k < 0:
                    break
                raw[k][tuple(s[i - k:i])][s[i]] += 1
    counts = [defaultdict(lambda: defaultdict(int)) for _ in range(order)]
    for ctx, d in raw[order - 1].items():
        counts[order - 1][ctx] = d
    for k in range(order - 2, -1, -1):
        for ctx, d in raw[k + 1].items():  # one left extension per (longer ctx, w)
            for w in d:
                counts[k][ctx[1:]][w] += 1
        for ctx, d in raw[k].items():  # n-grams starting with <s> have no left extension
            if ctx and ctx[0] == BOS:
                counts[k][ctx] = dict(d)
    words = [w for w in vocab if w not in (BOS,)] + ([UNK] if UNK not in vocab else [])
    words = list(dict.fromkeys(words))
    widx = {w: i for i, w in enumerate(words)}
    V = len(words)

    disc = []
    for k in range(order):
        n1 = sum(1 for d in counts[k].values() for c in d.values() if c == 1)
        n2 = sum(1 for d in counts[k].values() for c in d.values() if c == 2)
        disc.append(n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else 0.5)

    probs: list[dict] = [dict() for _ in range(order)]  # (ctx + (w,)) -> log10 p
    bows: list[dict] = [dict() for _ in range(order)]  # ctx -> log10 bow (ctx of order k+1 n-grams)

    def lower(ctx: tuple, w: str) -> float:
        """P(w | ctx) in the model built so far (ctx one shorter than the level being built)."""
        while True:
            k = len(ctx)
            p = probs[k].get(ctx + (w,))
            if p is not None:
                return 10 ** p
            if k == 0:
                return 10 ** probs[0][(UNK,)]
            b = bows[k].get(ctx, 0.0)
            return 10 ** b * lower(ctx[1:], w)

    # unigrams: interpolated with the uniform distribution over the vocabulary
    d0 = counts[0][()]
    tot = sum(d0.values())
    gamma = disc[0] * len(d0) / tot
    uni = np.full(V, gamma / V)
    for w, c in d0.items():
        if w in widx:
            uni[widx[w]] += max(c - disc[0], 0) / tot
    uni /= uni.sum()
    for w in words:
        probs[0][(w,)] = math.log10(uni[widx[w]])
    for k in range(1, order):
        D = disc[k]
        for ctx, d in counts[k].items():
            tot = sum(d.values())
            gamma = D * len(d) / tot
            kept = {w: c for w, c in d.items() if c >= min_count[k] and w in widx}
            p_kept, pl_kept = 0.0, 0.0
            for w, c in kept.items():
                pl = lower(ctx[1:], w)
                p = max(c - D, 0) / tot + gamma * pl
                probs[k][ctx + (w,)] = math.log10(p)
                p_kept += p
                pl_kept += pl
            if not kept:  # everything pruned: the context backs off with weight 1 (no entry)
                continue
            # backoff weight so that the context sums to one after pruning
            num, den = 1.0 - p_kept, 1.0 - pl_kept
            bows[k][ctx] = math.log10(max(num, 1e-12) / max(den, 1e-12)) if den > 1e-9 else -99.0
        # a kept n-gram's context must exist as an (order k) n-gram for ARPA's backoff chain
        # (always true without pruning); keep contexts whose entry was pruned away
        for ctx in list(bows[k]):
            if ctx not in probs[k - 1] and len(ctx) == k:
                probs[k - 1][ctx] = math.log10(max(lower(ctx[:-1], ctx[-1]), 1e-12))
        print(f"  order {k + 1}: {len(probs[k])} n-grams (D={D:.3f})", file=sys.stderr, flush=True)
    probs[0][(BOS,)] = -99.0
    lines = ["", "\\data\\"]
    for k in range(order):
        lines.append(f"ngram {k + 1}={len(probs[k])}")
    for k in range(order):
        lines += ["", f"\\{k + 1}-grams:"]
        for g, p in sorted(probs[k].items()):
            b = bows[k + 1].get(g) if k + 1 < order else None
            lines.append(f"{p:.5f}\t{' '.join(g)}" + (f"\t{b:.5f}" if b is not None and g[-1] != EOS else ""))
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


class ArpaScorer:
    """An ARPA model scored as ESPnet's `NgramFullScorer` scores kenlm: log10 probabilities of
    every token of the list given the hypothesis so far (starting at <s>), backing off through
    the contexts; a token the LM lacks scores as <unk> (-100 when the file has none, as kenlm).
    Used with FunASR's `BeamSearchPara` (`scorers["ngram"]`) by the fixtures and the evaluation."""

    def __init__(self, path: Path, token_list: list[str]):
        self.p: dict[tuple, float] = {}
        self.b: dict[tuple, float] = {}
        self.order = 0
        section = 0
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            import gzip

            raw = gzip.decompress(raw)
        for line in raw.decode().splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("\\") and line.endswith("-grams:"):
                section = int(line[1:].split("-")[0])
                self.order = max(self.order, section)
                continue
            if line.startswith("\\") or line.startswith("ngram ") or section == 0:
                continue
            f = line.split()
            g = tuple(f[1:1 + section])
            self.p[g] = float(f[0])
            if len(f) > 1 + section:
                self.b[g] = float(f[1 + section])
        self.tokens = token_list
        self.unk = self.p.get((UNK,), -100.0)
        self.cache: dict[tuple, np.ndarray] = {}

    def logp10(self, ctx: tuple, w: str) -> float:
        ctx = ctx[max(0, len(ctx) - (self.order - 1)):]
        bow = 0.0
        while True:
            p = self.p.get(ctx + (w,))
            if p is not None:
                return bow + p
            if not ctx:
                return bow + self.unk
            bow += self.b.get(ctx, 0.0)
            ctx = ctx[1:]

    def dist(self, ctx: tuple) -> np.ndarray:
        ctx = ctx[max(0, len(ctx) - (self.order - 1)):]
        if ctx not in self.cache:
            self.cache[ctx] = np.array([self.logp10(ctx, w) for w in self.tokens], dtype=np.float64)
        return self.cache[ctx]

    # ESPnet ScorerInterface (full scorer): the state is the token context
    def init_state(self, x):
        return ()

    def score(self, y, state, x):
        import torch

        ctx = (BOS,) + tuple(self.tokens[int(t)] for t in y[1:])
        return torch.tensor(self.dist(ctx), dtype=x.dtype), state

    def final_score(self, state):
        return 0.0


def funasr_scorer(path: Path, token_list: list[str]):
    """An `ArpaScorer` that is also a FunASR `ScorerInterface` (a full scorer of `BeamSearchPara`)."""
    from funasr.models.transformer.scorers.scorer_interface import ScorerInterface

    class NgramScorer(ArpaScorer, ScorerInterface):
        pass

    return NgramScorer(path, token_list)


def funasr_beam_search(model_dir: Path, token_list: list[str], model=None):
    """FunASR's `BeamSearchPara` as the model directory's `decoding.yaml` configures it (None
    without the file, or with neither an LM nor a CTC weight in use). `decoding_ctc_weight`
    needs `model` (its CTC layer). Set it as `model.beam_search` (and `model.nbest = 1`) and
    `Paraformer.inference` decodes with it."""
    import yaml
    from funasr.models.paraformer.search import BeamSearchPara
    from funasr.models.transformer.scorers.length_bonus import LengthBonus

    f = Path(model_dir) / "decoding.yaml"
    if not f.exists():
        return None
    c = yaml.safe_load(f.read_text()) or {}
    w = float(c.get("ngram_weight", 0.0))
    cw = float(c.get("decoding_ctc_weight", 0.0))
    if cw > 0 and (model is None or getattr(model, "ctc", None) is None):
        cw = 0.0  # as Paraformer.inference: no CTC layer, no CTC scoring
    if w <= 0 and cw <= 0:
        return None
    scorers = dict(length_bonus=LengthBonus(len(token_list)))
    if cw > 0:
        from funasr.models.transformer.scorers.ctc import CTCPrefixScorer

        scorers = dict(ctc=CTCPrefixScorer(ctc=model.ctc, eos=2), **scorers)
    if w > 0:
        scorers["ngram"] = funasr_scorer(Path(model_dir) / c["ngram_file"], token_list)
    weights = dict(decoder=1.0 - cw, ctc=cw, lm=0.0, ngram=w, length_bonus=float(c.get("penalty", 0.0)))
    return BeamSearchPara(beam_size=int(c.get("beam_size", 10)), weights=weights, scorers=scorers,
                          sos=1, eos=2, vocab_size=len(token_list), token_list=token_list,
                          pre_beam_score_key="full")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="Paraformer directory (its tokens.json)")
    ap.add_argument("--out", type=Path, help="ARPA file, gzip-compressed if it ends in .gz (default MODEL/ngram.arpa)")
    ap.add_argument("--order", type=int, default=6)
    ap.add_argument("--min-count", default="1,1,1,1,2,2",
                    help="per-order count cut-offs, comma-separated (last value repeats)")
    ap.add_argument("--n-train", type=int, default=10000, help="the speech generator's --n")
    ap.add_argument("--seed", type=int, default=0, help="the speech generator's --seed")
    ap.add_argument("--decoding", default=None,
                    help="also write decoding.yaml: 'beam_size,ngram_weight[,decoding_ctc_weight]' (e.g. 8,1.0,0.3)")
    args = ap.parse_args()
    t0 = time.time()
    out = args.out or args.model / "ngram.arpa"
    mc = [int(x) for x in args.min_count.split(",")]
    mc = (mc + [mc[-1]] * args.order)[: args.order]
    texts = lm_texts(args.n_train, args.seed)
    seqs, tokens = tokenize(texts, args.model)
    vocab = [t for t in tokens if t not in ("<blank>",)]
    arpa = build_arpa(seqs, vocab, args.order, mc)
    if out.suffix == ".gz":  # gzip without a timestamp: the same text gives the same bytes
        import gzip

        out.write_bytes(gzip.compress(arpa.encode(), compresslevel=9, mtime=0))
    else:
        out.write_text(arpa)
    if args.decoding:
        beam, w, *cw = args.decoding.split(",")
        cw = float(cw[0]) if cw else 0.0
        (out.parent / "decoding.yaml").write_text(
            "# Beam search with n-gram shallow fusion (FunASR BeamSearchPara + ESPnet NgramFullScorer)\n"
            "# and joint CTC prefix scoring (CTCPrefixScorer, when the checkpoint has its CTC layer):\n"
            "# score = decoder log-prob + ngram_weight * log10 P_ngram + decoding_ctc_weight * CTC prefix\n"
            "# score (+ penalty per token)\n"
            f"beam_size: {int(beam)}\nngram_file: {out.name}\nngram_weight: {float(w)}\n"
            f"decoding_ctc_weight: {cw}\npenalty: 0.0\n")
    print(json.dumps(dict(sentences=len(texts), tokens=sum(map(len, seqs)), order=args.order, min_count=mc,
                          bytes=out.stat().st_size, seconds=round(time.time() - t0, 1))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

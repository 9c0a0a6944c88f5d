#!/usr/bin/env python3
"""Does a MusicGen (or a MAGNeT) listen to one attribute of its caption? A teacher-forced test,
free of the noise of sampling and beat tracking.

    /work/venv/ref/bin/python training/eval/caption_tie.py --model DIR --codec CODEC_DIR \
        --manifest data/music/manifest.jsonl [--attribute tempo|instrument] [--n 72] [--seconds 3] \
        [--kind musicgen|magnet]

For each held-out test clip, the cross-entropy of its own codec tokens (the first --seconds from
frame 0, where generation starts; the delay pattern as in training) is computed under its true
caption and under the same caption with one attribute changed: the tempo by x1.25 or /1.25
(rounded to 5 bpm, kept in 60-160), or the instrument by another of the generator's twelve. A
model that uses the attribute predicts the clip better from the true caption: `gap` (nats per
token, wrong minus true) > 0 and `true_better` (share of clips) near 1. A model that ignores it
has gap ~0 and true_better ~0.5. `early_*` restrict the average to the first two beat periods,
where only the caption can tell when the second onset falls. DIR is a Hugging Face MusicGen
directory, or a musicgen.py run directory (its ckpt.pt, with --base the HF directory whose config
it fits). Prints JSON.

With --kind magnet, DIR is a magnet.py model directory (state_dict.bin + t5/) or run directory
(ckpt.pt, with --base the model directory whose xp.cfg and t5/ it fits), and the cross-entropy is
that of MAGNeT's first decoding step: the first codebook (stage 0) of the segment fully masked, so
each token is predicted from the caption and its position alone; `early_*` as above. `half_*` repeat
the test with half the frames masked in spans (fixed per clip), the middle of the decoding.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import beat_period, codec_tokens, delay_batch, encode_captions, read_manifest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from music import INSTRUMENTS as GENERATED  # noqa: E402  (data/music.py's twelve caption words)

# The generator's instruments in the ring whose +5 step picks each swap (the order the reported
# numbers were measured with; the generator's dict order would pair them differently).
INSTRUMENTS = ["piano", "organ", "flute", "violin", "cello", "clarinet", "trumpet", "acoustic guitar", "harp",
               "strings", "marimba", "saxophone"]
assert sorted(INSTRUMENTS) == sorted(GENERATED), "caption_tie.py's ring is out of step with data/music.py"


def changed(row: dict, attribute: str) -> str | None:
    text, a = row["text"], row["attributes"]
    if attribute == "tempo":
        bpm = a["bpm"]
        order = [1.25, 0.8] if random.Random(bpm).random() < 0.5 else [0.8, 1.25]
        for f in order:
            b = int(round(bpm * f / 5)) * 5
            if 60 <= b <= 160 and f"at {bpm} bpm" in text:
                return text.replace(f"at {bpm} bpm", f"at {b} bpm")
        return None
    inst = a["instrument"]
    if inst not in INSTRUMENTS or inst not in text:
        return None
    return text.replace(inst, INSTRUMENTS[(INSTRUMENTS.index(inst) + 5) % len(INSTRUMENTS)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--base", type=Path, default=None, help="HF dir for a run directory's ckpt.pt")
    ap.add_argument("--codec", type=Path, required=True, help="the codec dir (its music_codes.pt cache is reused)")
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--attribute", choices=["tempo", "instrument"], default="tempo")
    ap.add_argument("--n", type=int, default=72)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kind", choices=["musicgen", "magnet"], default="musicgen")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.kind == "magnet":
        return magnet_tie(args)
    from tokenizers import Tokenizer
    from transformers import MusicgenForConditionalGeneration

    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    if (args.model / "ckpt.pt").exists():
        from transformers import MusicgenConfig

        cfg = MusicgenConfig.from_pretrained(args.base)
        cfg.text_encoder.vocab_size = tok.get_vocab_size()  # the run's own caption tokenizer
        model = MusicgenForConditionalGeneration(cfg)
        model.load_state_dict(torch.load(args.model / "ckpt.pt", weights_only=False)["model"])
    else:
        model = MusicgenForConditionalGeneration.from_pretrained(args.model)
    model = model.float().eval()
    card, K = model.config.decoder.vocab_size, model.config.decoder.num_codebooks
    rate = model.config.audio_encoder.frame_rate
    rows = [r for r in read_manifest(args.manifest) if r["split"] == "test"][: args.n]
    codes = codec_tokens(args.codec, rows, args.codec.parent / "music_codes.pt")
    frames = int(args.seconds * rate)
    res = []
    with torch.no_grad():
        for r in rows:
            other = changed(r, args.attribute)
            if other is None:
                continue
            seg = codes[r["path"]][:, :frames]
            inp, lab = delay_batch([seg, seg], card)
            ids, mask = encode_captions(tok, [r["text"], other])
            enc = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=inp).logits
            ce = F.cross_entropy(logits.reshape(-1, card), lab.reshape(-1), ignore_index=-100,
                                 reduction="none").reshape(2, K, -1)
            valid = (lab[0] != -100).float()
            early = torch.zeros_like(valid)
            n2 = early_frames(r, rate)
            for k in range(K):
                early[k, k: k + n2] = 1
            early = early * valid
            mean = lambda w: ((ce * w).sum((1, 2)) / w.sum()).tolist()  # noqa: E731
            res.append(mean(valid) + mean(early))
    out = dict(model=str(args.model), attribute=args.attribute, n=len(res), seconds=args.seconds, **summarise(res))
    print(json.dumps(out))
    return 0


def early_frames(r, rate) -> int:
    """How many frames from frame 0 the first two beat periods (from the caption's tempo) span."""
    return int(2 * beat_period(r, rate)) + 1


def summarise(res) -> dict:
    """res: per clip [ce true, ce changed, early ce true, early ce changed] -> the reported means."""
    a = torch.tensor(res)
    return dict(ce_true=round(a[:, 0].mean().item(), 4), ce_changed=round(a[:, 1].mean().item(), 4),
                gap=round((a[:, 1] - a[:, 0]).mean().item(), 4),
                true_better=round((a[:, 0] < a[:, 1]).float().mean().item(), 3),
                early_gap=round((a[:, 3] - a[:, 2]).mean().item(), 4),
                early_true_better=round((a[:, 2] < a[:, 3]).float().mean().item(), 3))


def magnet_tie(args) -> int:
    from omegaconf import OmegaConf
    from tokenizers import Tokenizer
    from transformers import EncodecConfig, T5EncoderModel

    from common import import_audiocraft

    # training/magnet.py by path: tools/fixtures/magnet.py (on sys.path through common) has its name
    spec = importlib.util.spec_from_file_location("magnet_recipe", Path(__file__).resolve().parents[1] / "magnet.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    ac = import_audiocraft()
    base = args.base if (args.model / "ckpt.pt").exists() else args.model
    pkg = torch.load(base / "state_dict.bin", weights_only=False)
    cfg = OmegaConf.to_container(OmegaConf.create(pkg["xp.cfg"]))
    tok = Tokenizer.from_file(str(base / "t5" / "tokenizer.json"))
    t5 = T5EncoderModel.from_pretrained(base / "t5")
    rate = EncodecConfig.from_pretrained(args.codec).frame_rate
    lm = recipe.build(ac, cfg, tok, t5, rate)
    if (args.model / "ckpt.pt").exists():
        state = {k: v for k, v in torch.load(args.model / "ckpt.pt", weights_only=False)["model"].items()
                 if ".description.t5." not in k}  # the T5 of --base (frozen in the run)
    else:
        state = pkg["best_state"]
    lm.load_state_dict(state, strict=False)
    lm.eval()
    K, special = cfg["transformer_lm"]["n_q"], lm.special_token_id
    Attr = ac.conditioners.ConditioningAttributes
    rows = [r for r in read_manifest(args.manifest) if r["split"] == "test"][: args.n]
    codes = codec_tokens(args.codec, rows, args.codec.parent / "music_codes.pt")
    T = int(args.seconds * rate)
    table = recipe.rate_to_spans(T)
    full, half = [], []
    with torch.no_grad():
        for i, r in enumerate(rows):
            other = changed(r, args.attribute)
            if other is None:
                continue
            tokens = codes[r["path"]][:, :T].unsqueeze(0).expand(2, -1, -1)
            ct = lm.condition_provider(lm.condition_provider.tokenize(
                [Attr(text={"description": r["text"]}), Attr(text={"description": other})]))
            spans = recipe.span_mask(1, T, torch.Generator().manual_seed(i), table, rate=0.5)[0]
            early = torch.arange(T) < early_frames(r, rate)
            for sm, out in ((torch.ones(T, dtype=torch.bool), full), (spans, half)):
                mask = torch.zeros(2, K, T, dtype=torch.bool)
                mask[:, 0] = sm
                mask[:, 1:] = True
                inp = torch.where(mask, special, tokens)
                logits = lm.compute_predictions(inp, [], ct, stage=0).logits[:, 0]  # [2, T, card]
                ce = F.cross_entropy(logits.transpose(1, 2), tokens[:, 0], reduction="none")  # [2, T]
                mean = lambda w: (ce[:, w].mean(1)).tolist()  # noqa: E731
                out.append(mean(sm) + mean(sm & early) if (sm & early).any() else mean(sm) * 2)
    out = dict(model=str(args.model), kind="magnet", attribute=args.attribute, n=len(full), seconds=args.seconds,
               **summarise(full), **{f"half_{k}": v for k, v in summarise(half).items()})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Train a small offline Paraformer (FunASR `Paraformer`: SAN-M encoder, CIF predictor, SAN-M decoder).

    nice -n 19 /work/venv/ref/bin/python training/asr.py --data training/datasets --out training/runs/asr [--resume]

English characters as tokens, written the way FunASR's sentence_postprocess joins English
sub-words: every letter but the last of a word carries "@@" ("cat" = c@@ a@@ t), so the loaders'
ordinary postprocessing prints words. Front end: 80-dim Kaldi fbank, LFR m=7 n=3 (33 frames/s,
enough for ~15 characters/s), CMVN statistics measured on the training data (am.mvn).
SpecAugment-style time/frequency masking on the features. Writes OUT/model/{model.pt,
config.yaml, am.mvn, tokens.json}: the published FunASR directory layout.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Trainer, base_args, load_audio, read_manifest, seed_all  # noqa: E402

LETTERS = list("abcdefghijklmnopqrstuvwxyz'")
TOKENS = ["<blank>", "<s>", "</s>"] + [c + "@@" for c in LETTERS] + LETTERS + ["<unk>"]
FRONTEND = dict(fs=16000, window="hamming", n_mels=80, frame_length=25, frame_shift=10, lfr_m=7, lfr_n=3, dither=0.0)


def continued(pieces: list[str], ends_word: bool = True) -> list[str]:
    """The pieces of one word in the "@@" convention: every piece but a word's last carries "@@"."""
    return [p + "@@" for p in pieces[:-1]] + [pieces[-1] if ends_word else pieces[-1] + "@@"]


def text_to_ids(text: str, idx: dict[str, int] | None = None, bpe=None) -> list[int]:
    """Token ids of a transcript: letters, or BPE pieces when `bpe` (a `tokenizers` BPE) is given.

    `idx` maps tokens to ids (default: the letters' TOKENS). A BPE piece missing from it (only
    possible in text the BPE was not trained on) falls back to its letters.
    """
    idx = idx if idx is not None else {t: i for i, t in enumerate(TOKENS)}
    out = []
    for w in text.split():
        pieces = bpe.encode(w).tokens if bpe is not None else list(w)
        for k, t in enumerate(continued(pieces)):
            if t not in idx:
                out += [idx.get(c, idx["<unk>"]) for c in continued(list(pieces[k]), k == len(pieces) - 1)]
            else:
                out.append(idx[t])
    return out


def build_bpe(texts: list[str], vocab_size: int):
    """A byte-pair vocabulary over the training transcripts' words (deterministic: sorted input)
    and the token list it gives in the "@@" convention: specials, every letter in both forms
    (so any word can be written), then each piece in the forms the training words use."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], initial_alphabet=LETTERS,
                                  show_progress=False)
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    seen: dict[str, int] = {}
    for t in texts:
        for w in t.split():
            pieces = tok.encode(w).tokens
            for p in continued(pieces):
                seen[p] = seen.get(p, 0) + 1
    base = ["<blank>", "<s>", "</s>"] + [c + "@@" for c in LETTERS] + LETTERS
    extra = sorted((p for p in seen if p not in base and p != "<unk>"), key=lambda p: (-seen[p], p))
    return tok, base + extra + ["<unk>"]


def write_mvn(path: Path, shift, scale):
    row = lambda v: " ".join(f"{x:.6f}" for x in v)  # noqa: E731
    n = len(shift)
    path.write_text(f"<Nnet>\n<Splice> {n} {n}\n[ 0 ]\n<AddShift> {n} {n}\n<LearnRateCoef> 0 [ {row(shift)} ]\n"
                    f"<Rescale> {n} {n}\n<LearnRateCoef> 0 [ {row(scale)} ]\n</Nnet>\n")


def confs(smoke: bool, blocks: int = 6):
    d = 64 if smoke else 144
    enc = dict(output_size=d, attention_heads=4, linear_units=4 * d, num_blocks=2 if smoke else blocks, dropout_rate=0.1,
               positional_dropout_rate=0.1, attention_dropout_rate=0.1, input_layer="pe",
               pos_enc_class="SinusoidalPositionEncoder", normalize_before=True, kernel_size=11, sanm_shfit=0,
               selfattention_layer_type="sanm")
    dec = dict(attention_heads=4, linear_units=4 * d, num_blocks=1 if smoke else 2, dropout_rate=0.1,
               positional_dropout_rate=0.1, self_attention_dropout_rate=0.1, src_attention_dropout_rate=0.1,
               att_layer_num=1 if smoke else 2, kernel_size=11, sanm_shfit=0)
    pred = dict(idim=d, threshold=1.0, l_order=1, r_order=1, tail_threshold=0.45)
    return enc, dec, pred


def load_paraformer(model_dir: Path):
    """(model, frontend, tokenizer) from a FunASR directory written by this recipe."""
    from funasr.frontends.wav_frontend import WavFrontend
    from funasr.models.paraformer.model import Paraformer
    from funasr.tokenizer.char_tokenizer import CharTokenizer

    c = yaml.safe_load((model_dir / "config.yaml").read_text())
    tokens = json.loads((model_dir / "tokens.json").read_text())
    m = Paraformer(encoder=c["encoder"], encoder_conf=c["encoder_conf"], decoder=c["decoder"],
                   decoder_conf=c["decoder_conf"], predictor=c["predictor"], predictor_conf=c["predictor_conf"],
                   input_size=c["input_size"], vocab_size=len(tokens), **c["model_conf"])
    if (model_dir / "model.pt").exists():
        sd = torch.load(model_dir / "model.pt", map_location="cpu")
    else:  # the shipped defaults: the same keys as safetensors (float16)
        from safetensors.torch import load_file

        sd = {k: v.float() for k, v in load_file(model_dir / "model.safetensors").items()}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    # a directory without the CTC head (greedy / LM-only decoding needs none)
    if unexpected or any(not k.startswith("ctc.") for k in missing):
        raise RuntimeError(f"{model_dir}: missing {missing}, unexpected {unexpected}")
    fe = WavFrontend(cmvn_file=str(model_dir / "am.mvn"), **c["frontend_conf"])
    tok = CharTokenizer(token_list=tokens, unk_symbol="<unk>", split_with_space=True)
    return m.eval(), fe, tok


def warped_features(fe, waves: list, warps: list[float]):
    """FunASR WavFrontend's features (fbank, LFR, CMVN; padded with 0 like its forward), each
    utterance's fbank computed with a Kaldi VTLN warp factor (1.0 = the frontend itself)."""
    from funasr.frontends.wav_frontend import apply_cmvn, apply_lfr
    from torchaudio.compliance import kaldi

    mats = []
    for w, a in zip(waves, warps):
        w = w * (1 << 15) if fe.upsacle_samples else w
        m = kaldi.fbank(w[None], num_mel_bins=fe.n_mels, frame_length=min(fe.frame_length, len(w) / fe.fs * 1000),
                        frame_shift=fe.frame_shift, dither=fe.dither, energy_floor=0.0, window_type=fe.window,
                        sample_frequency=fe.fs, snip_edges=fe.snip_edges, vtln_warp=float(a))
        if fe.lfr_m != 1 or fe.lfr_n != 1:
            m = apply_lfr(m, fe.lfr_m, fe.lfr_n)
        if fe.cmvn is not None:
            m = apply_cmvn(m, fe.cmvn)
        mats.append(m)
    lens = torch.tensor([len(m) for m in mats])
    return torch.nn.utils.rnn.pad_sequence(mats, batch_first=True, padding_value=0.0), lens


def main() -> int:
    p = base_args(__doc__, steps=2500, batch=16, ckpt_every=250)
    p.add_argument("--enc-blocks", type=int, default=6, help="SAN-M encoder blocks")
    # FunASR's own Paraformer recipes (egs/aishell/paraformer) train with a CTC branch of
    # weight 0.3 on the encoder; it speeds up the encoder's convergence. Its weights
    # (ctc.ctc_lo.*) stay in model.pt; greedy inference does not read them, joint CTC decoding
    # (`decoding_ctc_weight` in decoding.yaml) does.
    p.add_argument("--ctc-weight", type=float, default=0.3, help="auxiliary CTC loss weight (0 = none)")
    # Utterances are 1-8.5 s long: a batch of 16 random ones is about half padding. Drawing a pool
    # of N batches at once and cutting it into batches of similar length (shuffled) saves most
    # of that compute without changing what a step sees on average. 1 = no bucketing.
    p.add_argument("--bucket", type=int, default=8, help="length-bucketing pool, in batches (1 = off)")
    # Letters make the non-autoregressive decoder spell each word from sound alone ("chick in
    # sup"); sub-word units (FunASR's English Paraformer uses BPE) let it emit whole common words
    # and fire the CIF about 2.5x less often. 0 = letters.
    p.add_argument("--speed-perturb", default=None, metavar="LO,HI",
                   help="speed perturbation: each utterance resampled by a factor drawn in [LO, HI] "
                        "(0.01 steps) and read as 16 kHz, so it plays 1/factor as fast with pitch "
                        "and formants moved together (Kaldi/FunASR-style; e.g. 0.85,1.15)")
    # Vocal tract length perturbation (Jaitly & Hinton 2013, "Vocal Tract Length Perturbation
    # (VTLP) improves speech recognition"): the mel filterbank's frequency axis is warped by a
    # factor drawn per utterance, which moves formants without touching duration or pitch, i.e.
    # a new speaker. Kaldi's fbank implements the piecewise-linear VTLN warp (`vtln_warp`), which
    # torchaudio.compliance.kaldi.fbank (FunASR's WavFrontend) exposes.
    p.add_argument("--vtlp", default=None, metavar="LO,HI",
                   help="vocal tract length perturbation: each utterance's fbank computed with a Kaldi "
                        "VTLN warp factor drawn in [LO, HI] (e.g. 0.9,1.1); inference is unchanged")
    p.add_argument("--bpe", type=int, default=0, help="BPE vocabulary size for sub-word tokens (0 = letters)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="FunASR model directory to start from (e.g. a letters run): every tensor whose shape "
                        "matches is copied (encoder, predictor, decoder body); its am.mvn is reused")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.batch, args.ckpt_every = min(args.steps, 30), 4, 10
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    from funasr.frontends.wav_frontend import WavFrontend
    from funasr.models.paraformer.model import Paraformer

    rows = read_manifest(args.data / "speech" / "manifest.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    dst = args.out / "model"
    dst.mkdir(parents=True, exist_ok=True)
    input_size = FRONTEND["n_mels"] * FRONTEND["lfr_m"]
    bpe, tokens = None, TOKENS
    if args.bpe:
        bpe, tokens = build_bpe([r["text"] for r in train], args.bpe)
    if args.init_from is not None and not (dst / "am.mvn").exists():
        shutil.copy(args.init_from / "am.mvn", dst / "am.mvn")  # the encoder was trained on these statistics
    if not (dst / "am.mvn").exists():  # CMVN from 200 training utterances
        fe0 = WavFrontend(cmvn_file=None, **FRONTEND)
        feats = []
        for r in random.Random(args.seed).sample(train, min(200, len(train))):
            w = torch.from_numpy(load_audio(r["path"], 16000))[None]
            f, _ = fe0(w, torch.tensor([w.shape[1]]))
            feats.append(f[0])
        allf = torch.cat(feats)
        write_mvn(dst / "am.mvn", (-allf.mean(0)).tolist(), (1.0 / (allf.std(0) + 1e-5)).tolist())
    fe = WavFrontend(cmvn_file=str(dst / "am.mvn"), **FRONTEND)
    enc, dec, pred = confs(args.smoke, args.enc_blocks)
    model_conf = dict(ctc_weight=args.ctc_weight, predictor_bias=1, sampling_ratio=0.75, predictor_weight=1.0)
    config = dict(model="Paraformer", model_conf=model_conf, encoder="SANMEncoder", encoder_conf=enc,
                  decoder="ParaformerSANMDecoder", decoder_conf=dec, predictor="CifPredictorV2", predictor_conf=pred,
                  frontend="WavFrontend", frontend_conf=FRONTEND, tokenizer="CharTokenizer",
                  tokenizer_conf=dict(unk_symbol="<unk>", split_with_space=True), input_size=input_size, normalize=None)
    model = Paraformer(encoder="SANMEncoder", encoder_conf=enc, decoder="ParaformerSANMDecoder", decoder_conf=dec,
                       predictor="CifPredictorV2", predictor_conf=pred, input_size=input_size,
                       vocab_size=len(tokens), **model_conf)
    if args.init_from is not None and not (args.resume and (args.out / "ckpt.pt").exists()):
        src = torch.load(args.init_from / "model.pt", map_location="cpu")
        own = model.state_dict()
        keep = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(keep, strict=False)
        print(f"initialised {len(keep)}/{len(own)} tensors from {args.init_from}; fresh: "
              f"{sorted(k for k in own if k not in keep)}", flush=True)
    # written first, so a checkpoint can be scored while training runs (ckpt.pt's "model" + these)
    (dst / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (dst / "tokens.json").write_text(json.dumps(tokens))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    tr = Trainer(args, model, opt)
    rng = random.Random(args.seed + tr.step)
    token_ids = {t: i for i, t in enumerate(tokens)}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"paraformer: {n_params:,} parameters, {len(tokens)} tokens, {len(train)} train utterances", flush=True)
    model.train()
    pool: list[list[dict]] = []
    sp = [float(v) for v in args.speed_perturb.split(",")] if args.speed_perturb else None
    vt = [float(v) for v in args.vtlp.split(",")] if args.vtlp else None

    def rate() -> int:
        """The rate an utterance is loaded at (16 kHz, or perturbed)."""
        return 16000 if sp is None else int(round(16000 * round(rng.uniform(*sp), 2)))

    while not tr.done():
        tr.lr_step()
        if not pool:
            drawn = sorted((rng.choice(train) for _ in range(args.batch * max(1, args.bucket))), key=lambda r: r["seconds"])
            pool = [drawn[i: i + args.batch] for i in range(0, len(drawn), args.batch)]
            rng.shuffle(pool)
        picks = pool.pop()
        waves = [torch.from_numpy(load_audio(r["path"], rate())) for r in picks]
        with torch.no_grad():
            if vt is None:  # FunASR's own frontend on the padded batch
                x = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
                feats, fl = fe(x, torch.tensor([len(w) for w in waves]))
            else:
                feats, fl = warped_features(fe, waves, [rng.uniform(*vt) for _ in waves])
            for b in range(len(picks)):  # SpecAugment: 2 freq masks, 2 time masks
                for _ in range(2):
                    f0 = rng.randint(0, feats.shape[2] - 30)
                    feats[b, :, f0: f0 + rng.randint(0, 30)] = 0
                    t0 = rng.randint(0, max(0, int(fl[b]) - 10))
                    feats[b, t0: t0 + rng.randint(0, 5)] = 0
        ids = [torch.tensor(text_to_ids(r["text"], token_ids, bpe)) for r in picks]
        il = torch.tensor([len(i) for i in ids])
        y = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=-1)
        loss, stats, _ = model(feats, fl, y, il)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        tr.end_step({k: float(v) for k, v in stats.items() if v is not None and k in ("loss", "loss_att", "loss_pre", "loss_ctc", "acc")},
                    samples=args.batch)
    model.eval()
    torch.save(model.state_dict(), dst / "model.pt")
    m2, fe2, tok = load_paraformer(dst)  # reload from the directory and transcribe one dev clip
    dev = [r for r in rows if r["split"] == "dev"] or rows
    w = torch.from_numpy(load_audio(dev[0]["path"], 16000))
    with torch.no_grad():
        res, _ = m2.inference([w], key=["u"], tokenizer=tok, frontend=fe2, device="cpu")
    summary = dict(tr.summary(), parameters=n_params, ref=dev[0]["text"], hyp=res[0]["text"])
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

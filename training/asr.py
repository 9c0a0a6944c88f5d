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
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Trainer, base_args, load_audio, read_manifest, seed_all  # noqa: E402

LETTERS = list("abcdefghijklmnopqrstuvwxyz'")
TOKENS = ["<blank>", "<s>", "</s>"] + [c + "@@" for c in LETTERS] + LETTERS + ["<unk>"]
FRONTEND = dict(fs=16000, window="hamming", n_mels=80, frame_length=25, frame_shift=10, lfr_m=7, lfr_n=3, dither=0.0)


def text_to_ids(text: str) -> list[int]:
    idx = {t: i for i, t in enumerate(TOKENS)}
    out = []
    for w in text.split():
        out += [idx.get(c + "@@", idx["<unk>"]) for c in w[:-1]] + [idx.get(w[-1], idx["<unk>"])]
    return out


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
    m.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu"))
    fe = WavFrontend(cmvn_file=str(model_dir / "am.mvn"), **c["frontend_conf"])
    tok = CharTokenizer(token_list=tokens, unk_symbol="<unk>", split_with_space=True)
    return m.eval(), fe, tok


def main() -> int:
    p = base_args(__doc__, steps=2500, batch=16, ckpt_every=250)
    p.add_argument("--enc-blocks", type=int, default=6, help="SAN-M encoder blocks")
    # FunASR's own Paraformer recipes (egs/aishell/paraformer) train with a CTC branch of
    # weight 0.3 on the encoder; it speeds up the encoder's convergence. Its weights
    # (ctc.ctc_lo.*) stay in model.pt; inference does not read them.
    p.add_argument("--ctc-weight", type=float, default=0.3, help="auxiliary CTC loss weight (0 = none)")
    # Utterances are 1-8.5 s long: a batch of 16 random ones is about half padding. Drawing a pool
    # of N batches at once and cutting it into batches of similar length (shuffled) saves most
    # of that compute without changing what a step sees on average. 1 = no bucketing.
    p.add_argument("--bucket", type=int, default=8, help="length-bucketing pool, in batches (1 = off)")
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
                       vocab_size=len(TOKENS), **model_conf)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    tr = Trainer(args, model, opt)
    rng = random.Random(args.seed + tr.step)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"paraformer: {n_params:,} parameters, {len(train)} train utterances", flush=True)
    model.train()
    pool: list[list[dict]] = []
    while not tr.done():
        tr.lr_step()
        if not pool:
            drawn = sorted((rng.choice(train) for _ in range(args.batch * max(1, args.bucket))), key=lambda r: r["seconds"])
            pool = [drawn[i: i + args.batch] for i in range(0, len(drawn), args.batch)]
            rng.shuffle(pool)
        picks = pool.pop()
        waves = [torch.from_numpy(load_audio(r["path"], 16000)) for r in picks]
        wl = torch.tensor([len(w) for w in waves])
        x = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
        with torch.no_grad():
            feats, fl = fe(x, wl)
            for b in range(len(picks)):  # SpecAugment: 2 freq masks, 2 time masks
                for _ in range(2):
                    f0 = rng.randint(0, feats.shape[2] - 30)
                    feats[b, :, f0: f0 + rng.randint(0, 30)] = 0
                    t0 = rng.randint(0, max(0, int(fl[b]) - 10))
                    feats[b, t0: t0 + rng.randint(0, 5)] = 0
        ids = [torch.tensor(text_to_ids(r["text"])) for r in picks]
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
    (dst / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (dst / "tokens.json").write_text(json.dumps(TOKENS))
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

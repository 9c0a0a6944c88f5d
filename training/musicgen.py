#!/usr/bin/env python3
"""Train a small MusicGen (transformers `MusicgenForConditionalGeneration`, HF directory).

    nice -n 19 /work/venv/ref/bin/python training/musicgen.py --data training/datasets \
        --codec training/runs/codec/model --out training/runs/musicgen [--resume]

The music clips are tokenised once with the trained codec (cached next to the codec dir, in CODEC/../music_codes.pt, shared with magnet.py). A small T5
text encoder (trained from scratch jointly, Unigram tokenizer trained on the captions) conditions
a decoder over the codec's 4 codebooks with the delay pattern, exactly the layout
`MusicgenForConditionalGeneration.generate` decodes. Captions are dropped 15% of the time
(zeroed encoder states and mask, what transformers' CFG uses as the unconditional half).
Writes OUT/model/ (config.json, model.safetensors with the codec inside, generation_config.json,
tokenizer.json) -- the directory `cadenza` loads as a `kind = "music"` HF model.

Tying the caption's tempo to the beat (training/README.md, "Seventh sitting"): --beat-crops P starts
segments on a beat of the clip, --early-weight W weights their first two beat periods, and
--beat-aux W adds a beat-phase head on the decoder (training only: the export is unchanged). They
read `attributes.bpm` from the manifest and assume a beat at 0 s, as data/music.py renders.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BeatAux, Trainer, base_args, beat_period, build_caption_tokenizer,  # noqa: E402
                    codec_tokens, crop_start, delay_batch, encode_captions, read_manifest, seed_all, t5_config)


def sample_batch(rows, codes, tok, b, frames, rng, drop, frame_rate=50, beat_crops=0.0):
    picks = [rng.choice(rows) for _ in range(b)]
    segs, starts = [], []
    for r in picks:
        c = codes[r["path"]]
        s = crop_start(r, c.shape[1], frames, frame_rate, rng, beat_crops)
        seg = c[:, s: s + frames]
        if seg.shape[1] < frames:
            seg = torch.cat([seg, seg[:, -1:].expand(-1, frames - seg.shape[1])], 1)
        segs.append(seg)
        starts.append(s)
    ids, mask = encode_captions(tok, [r["text"] for r in picks])
    keep = torch.tensor([rng.random() >= drop for _ in picks])
    return segs, ids, mask, keep, picks, starts


def early_weights(picks, starts, frames, K, frame_rate, weight, beats=2.0):
    """Per-label loss weights [B, K, frames + K - 1] (delay layout: codebook k's frame f sits at
    position f + k): `weight` on the frames of a segment that opens on a beat (start 0 or a beat
    frame) up to `beats` beat periods in, else 1. Those frames hold the onsets whose place only the
    caption's tempo tells (later onsets repeat the period already heard)."""
    w = torch.ones(len(picks), K, frames + K - 1)
    for b, (r, s) in enumerate(zip(picks, starts)):
        period = beat_period(r, frame_rate)
        if abs(s / period - round(s / period)) * period > 0.51:
            continue
        n = min(frames, int(beats * period) + 1)
        for k in range(K):
            w[b, k, k: k + n] = weight
    return w


def main() -> int:
    p = base_args(__doc__, steps=2500, batch=16, ckpt_every=200)
    p.add_argument("--codec", type=Path, required=True, help="HF EnCodec dir from codec.py")
    p.add_argument("--seconds", type=float, default=5.0, help="training segment length")
    # magnet.py --t5-from reuses this model's T5; freezing it when continuing a run keeps a MAGNeT
    # trained on that T5 valid (the optimiser state keeps its layout: frozen weights get no grad).
    p.add_argument("--freeze-t5", action="store_true", help="keep the T5 text encoder fixed")
    p.add_argument("--word-tokenizer", action="store_true",
                   help="one caption word = one token (common.build_caption_tokenizer(words=True)); "
                        "the default trains tokenizers' UnigramTrainer, which ends near letters here")
    p.add_argument("--init-from", type=Path, default=None,
                   help="HF MusicGen directory whose decoder and projection start this run (the T5 "
                        "starts fresh, for a new tokenizer); a fresh optimiser and schedule")
    p.add_argument("--beat-aux", type=float, default=0.0,
                   help="weight of an auxiliary loss: a linear head on the decoder's last hidden state "
                        "predicts the beat phase (cos, sin of 2 pi frame / beat period, from the caption's "
                        "tempo) at every frame of captioned segments; training only, not exported")
    p.add_argument("--early-weight", type=float, default=1.0,
                   help="loss weight of the first two beat periods of segments that start on a beat")
    p.add_argument("--beat-crops", type=float, default=0.0,
                   help="share of training segments that start on a beat of the clip (its caption's "
                        "tempo) instead of at a uniform frame")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.batch, args.ckpt_every, args.seconds = min(args.steps, 30), 4, 10, 2.0
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    from transformers import (EncodecModel, GenerationConfig, MusicgenConfig, MusicgenDecoderConfig,
                              MusicgenForConditionalGeneration)

    rows = read_manifest(args.data / "music" / "manifest.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    args.out.mkdir(parents=True, exist_ok=True)
    codes = codec_tokens(args.codec, rows, args.codec.parent / "music_codes.pt")  # shared with the other LM recipe
    tok = build_caption_tokenizer([r["text"] for r in rows], vocab_size=120 if args.smoke else 400,
                                  words=args.word_tokenizer)
    tok.save(str(args.out / "tokenizer.json"))  # for snapshots of OUT/ckpt.pt before the export
    codec = EncodecModel.from_pretrained(args.codec)
    cc = codec.config
    K, card = cc.num_quantizers, cc.codebook_size
    frame_rate = cc.frame_rate
    hidden, layers = (64, 2) if args.smoke else (256, 4)
    dec = MusicgenDecoderConfig(
        vocab_size=card, num_codebooks=K, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        ffn_dim=4 * hidden, max_position_embeddings=2048, activation_function="gelu", dropout=0.1,
        attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, scale_embedding=False, audio_channels=1,
        pad_token_id=card, bos_token_id=card, tie_word_embeddings=False)
    text = t5_config(tok.get_vocab_size(), 64 if args.smoke else 128, 2)
    model = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=text, audio_encoder=cc, decoder=dec))
    model.audio_encoder.load_state_dict(codec.state_dict())
    if args.init_from is not None and not args.resume:
        src = MusicgenForConditionalGeneration.from_pretrained(args.init_from).state_dict()
        own = model.state_dict()
        take = {k: v for k, v in src.items() if not k.startswith(("text_encoder.", "audio_encoder."))
                and k in own and own[k].shape == v.shape}
        model.load_state_dict(take, strict=False)
        print(f"init-from {args.init_from}: {len(take)} decoder/projection tensors, T5 fresh", flush=True)
    model.audio_encoder.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("audio_encoder.")]
    if args.freeze_t5:
        model.text_encoder.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=args.lr if args.lr != 1e-3 else 5e-4, weight_decay=0.01)
    args.lr = opt.param_groups[0]["lr"]
    tr = Trainer(args, model, opt)
    beat = BeatAux(hidden, tr, args.lr) if args.beat_aux > 0 else None
    rng = random.Random(args.seed + tr.step)
    frames = int(args.seconds * frame_rate)
    n_lm = sum(p.numel() for p in params)
    print(f"musicgen: {n_lm:,} trainable parameters (decoder + T5 + projection), {len(train)} train clips", flush=True)
    model.train()
    model.audio_encoder.eval()
    if args.freeze_t5:
        model.text_encoder.eval()
    while not tr.done():
        tr.lr_step()
        segs, ids, mask, keep, picks, starts = sample_batch(train, codes, tok, args.batch, frames, rng, drop=0.15,
                                              frame_rate=frame_rate, beat_crops=args.beat_crops)
        with torch.set_grad_enabled(not args.freeze_t5):
            enc = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        enc = enc * keep[:, None, None]
        mask = mask * keep[:, None]
        inp, lab = delay_batch(segs, card)
        out = model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=inp,
                    output_hidden_states=beat is not None)
        logits = out.logits.reshape(args.batch, K, inp.shape[-1], card)
        ce = F.cross_entropy(logits.reshape(-1, card), lab.reshape(-1), ignore_index=-100, reduction="none")
        valid = (lab.reshape(-1) != -100).float()
        plain = (ce * valid).sum() / valid.sum()
        if args.early_weight != 1.0:
            w = early_weights(picks, starts, frames, K, frame_rate, args.early_weight).reshape(-1) * valid
            loss = (ce * w).sum() / w.sum()
        else:
            loss = plain
        metrics = dict(loss=plain.item(), weighted=loss.item())
        if beat is not None:
            aux = beat.loss(out.decoder_hidden_states[-1], picks, starts, keep, frames, frame_rate,
                            lr=opt.param_groups[0]["lr"])
            loss = loss + args.beat_aux * aux
            metrics["beat_mse"] = aux.item()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # skips the frozen T5's absent grads
        opt.step()
        if beat is not None:
            beat.step()
        tr.end_step(metrics, samples=args.batch)
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=card, decoder_start_token_id=card, pad_token_id=card,
                                               do_sample=True, guidance_scale=3.0, top_k=50,
                                               max_length=int(10 * frame_rate) + K)
    dst = args.out / "model"
    model.save_pretrained(dst, safe_serialization=True)
    tok.save(str(dst / "tokenizer.json"))
    # reload with the reference class and generate 2 s for one held-out caption
    re = MusicgenForConditionalGeneration.from_pretrained(dst).eval()
    test = [r for r in rows if r["split"] == "test"] or rows
    ids, mask = encode_captions(tok, [test[0]["text"]])
    with torch.no_grad():
        audio = re.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2 * frame_rate + K - 1)
    import soundfile as sf
    sf.write(args.out / "sample.wav", audio[0, 0].numpy(), cc.sampling_rate)
    summary = dict(tr.summary(), trainable_parameters=n_lm, prompt=test[0]["text"], sample_samples=int(audio.shape[-1]),
                   sample_rms=round(float(audio.pow(2).mean().sqrt()), 4), frames_per_step=args.batch * frames)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

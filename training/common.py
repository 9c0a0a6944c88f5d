"""Shared code of the training recipes: manifests, audio, caption tokenizer, codec tokens,
checkpoint/resume, and the audiocraft import shim.

Every recipe is `python training/<recipe>.py --data DIR --out DIR [--smoke] [--resume]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "fixtures"))  # musicgen_audiocraft._import_audiocraft


# ----------------------------------------------------------------------------- manifests / audio

def read_manifest(path, split: str | None = None) -> list[dict]:
    """JSONL rows (path relative to the manifest's folder is made absolute)."""
    path = Path(path)
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        r["path"] = str((path.parent / r["path"]).resolve())
        if split is None or r["split"] == split:
            rows.append(r)
    return rows


def write_manifest(path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def load_audio(path, sr: int) -> np.ndarray:
    """Mono float32 at `sr` (polyphase resampling)."""
    x, r = sf.read(path, dtype="float32", always_2d=True)
    return resample(x.mean(1), r, sr)


def resample(x: np.ndarray, r: int, sr: int) -> np.ndarray:
    """Float32 `x` from rate `r` to rate `sr` (polyphase; unchanged when the rates agree)."""
    if r == sr:
        return x.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(r, sr)
    return resample_poly(x, sr // g, r // g).astype(np.float32)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- recipe plumbing

def base_args(desc: str, steps: int, batch: int, ckpt_every: int = 200) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=desc)
    p.add_argument("--data", type=Path, required=True, help="dataset folder with manifest.jsonl")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, final model in OUT/model)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ckpt-every", type=int, default=ckpt_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps: proves the recipe end to end")
    p.add_argument("--budget-min", type=float, default=None,
                   help="train for this many minutes of wall time (over all resumes) instead of --steps: "
                        "the learning-rate schedule runs over the time, and training stops when it is spent")
    return p


class Trainer:
    """Checkpoint every N steps to OUT/ckpt.pt (model + optimizer + step + RNG), resume, log JSONL."""

    def __init__(self, args, model: torch.nn.Module, opt: torch.optim.Optimizer, extra: dict | None = None):
        self.args, self.model, self.opt = args, model, opt
        args.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = args.out / "ckpt.pt"
        self.log = open(args.out / "train_log.jsonl", "a")
        self.step = 0
        self.spent_s = 0.0  # wall seconds trained before this process (resume), for --budget-min
        self.extra = extra or {}
        if args.resume and self.ckpt.exists():
            st = torch.load(self.ckpt, weights_only=False)
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            self.step = st["step"]
            self.extra.update(st.get("extra", {}))
            self.spent_s = st.get("spent_s", 0.0)
            torch.set_rng_state(st["rng"])
            print(f"resumed at step {self.step}", flush=True)
        self.t0 = time.time()
        self.step0 = self.step
        self.budget_s = None if getattr(args, "budget_min", None) is None else args.budget_min * 60.0

    def progress(self) -> float:
        """Fraction of the run done: of the time budget with --budget-min, else of --steps."""
        if self.budget_s is not None:
            return min(1.0, (self.spent_s + time.time() - self.t0) / self.budget_s)
        return min(1.0, self.step / max(1, self.args.steps))

    def lr_step(self):
        """Linear warm-up over 50 steps, then cosine from lr to lr/10 over the run."""
        f = min(1.0, (self.step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * self.progress())))
        for g in self.opt.param_groups:
            g["lr"] = self.args.lr * f

    def done(self) -> bool:
        if self.budget_s is not None:
            # decided once per step (in end_step), so the last step is always checkpointed
            return self.step > 0 and self.step == getattr(self, "_stop_at", -1)
        return self.step >= self.args.steps

    def end_step(self, metrics: dict, samples: int) -> None:
        self.step += 1
        if self.budget_s is not None and self.progress() >= 1.0:
            self._stop_at = self.step
        el = time.time() - self.t0
        rate = (self.step - self.step0) / max(el, 1e-9)
        rec = dict(step=self.step, elapsed_s=round(el, 1), steps_per_s=round(rate, 4),
                   samples_per_s=round(rate * samples, 3), **{k: round(float(v), 5) for k, v in metrics.items()})
        self.log.write(json.dumps(rec) + "\n")
        self.log.flush()
        if self.step % max(1, min(20, self.args.ckpt_every)) == 0 or self.step == 1 or self.done():
            print(json.dumps(rec), flush=True)
        if self.step % self.args.ckpt_every == 0 or self.done():
            self.save()

    def save(self):
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(dict(model=self.model.state_dict(), opt=self.opt.state_dict(), step=self.step,
                        rng=torch.get_rng_state(), extra=self.extra,
                        spent_s=self.spent_s + time.time() - self.t0), tmp)
        os.replace(tmp, self.ckpt)

    def summary(self) -> dict:
        el = time.time() - self.t0
        n = self.step - self.step0
        return dict(steps=n, seconds=round(el, 1), steps_per_s=round(n / max(el, 1e-9), 4))


# ----------------------------------------------------------------------------- MusicGen delay pattern

def delay_batch(codes: list[torch.Tensor], card: int):
    """codes: list of [K, T] -> decoder input ids [B*K, T+K-1], labels [B, K, T+K-1] (-100 = ignore;
    codebook k's frame f is label position f + k). Shared by musicgen.py and eval/caption_tie.py."""
    K, T = codes[0].shape
    B = len(codes)
    P = torch.full((B, K, T + K), card, dtype=torch.long)
    for b, c in enumerate(codes):
        for k in range(K):
            P[b, k, 1 + k: 1 + k + T] = c[k]
    inp = P[:, :, :-1]
    lab = P[:, :, 1:].clone()
    lab[lab == card] = -100
    return inp.reshape(B * K, -1), lab


# ----------------------------------------------------------------------------- the caption's tempo
# (musicgen.py and magnet.py: training/README.md, "Seventh sitting: the tempo tie")

def beat_period(r, frame_rate) -> float:
    """The clip's beat period in codec frames, from its caption's tempo (`attributes.bpm`)."""
    return 60.0 / r["attributes"]["bpm"] * frame_rate


def crop_start(r, n_frames, frames, frame_rate, rng, beat_crops):
    """A segment's first frame: uniform, or with probability `beat_crops` on one of the clip's
    beats (k * 60 / bpm s; the renders start on a beat at 0 s), so the segment opens on an
    onset at a known phase, as generation does, and where the next onset falls is decided by
    the caption's tempo alone."""
    last = max(0, n_frames - frames)
    if beat_crops > 0 and rng.random() < beat_crops:
        period = beat_period(r, frame_rate)
        beats = [round(k * period) for k in range(int(last / period) + 1)]
        return rng.choice([s for s in beats if s <= last] or [0])
    return rng.randint(0, last)


def beat_phase_loss(head, hidden, picks, starts, keep, frames, frame_rate):
    """MSE of head(hidden) against (cos, sin) of the beat phase 2 pi (start + j) / period at the
    positions j < frames (MusicGen's decoder: position j predicts frame j of the first codebook;
    MAGNeT: position j is frame j; the renders have a beat at frame 0, so the phase of every frame
    is known from the caption's tempo), over the segments whose caption was kept (without it the
    tempo is unknown). hidden: [B, T, D]; keep: [B] bools."""
    B, T, _ = hidden.shape
    j = torch.arange(T, dtype=torch.float32)
    target = torch.zeros(B, T, 2)
    w = torch.zeros(B, T)
    for b, (r, s) in enumerate(zip(picks, starts)):
        period = beat_period(r, frame_rate)
        ph = 2 * math.pi * (s + j) / period
        target[b, :, 0], target[b, :, 1] = torch.cos(ph), torch.sin(ph)
        if keep[b]:
            w[b, :frames] = 1.0
    err = ((head(hidden) - target) ** 2).sum(-1)
    return (err * w).sum() / w.sum().clamp(min=1.0)



class BeatAux:
    """musicgen.py's and magnet.py's --beat-aux: a linear head on the model's last hidden states
    predicting the beat phase (beat_phase_loss), with its own AdamW following the model's learning
    rate. Kept out of the model, so out of the exported checkpoint; saved in the Trainer
    checkpoint's `extra` (beat_head, beat_opt) and restored from it on --resume."""

    def __init__(self, dim: int, tr: Trainer, lr: float):
        self.head = torch.nn.Linear(dim, 2)
        self.opt = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=0.0)
        self.extra = tr.extra
        if "beat_head" in tr.extra:
            self.head.load_state_dict(tr.extra["beat_head"])
            self.opt.load_state_dict(tr.extra["beat_opt"])
        tr.extra.update(beat_head=self.head.state_dict(), beat_opt=self.opt.state_dict())

    def loss(self, hidden, picks, starts, keep, frames, frame_rate, lr: float) -> torch.Tensor:
        """The auxiliary loss of this step (its gradient cleared first, its learning rate set to `lr`)."""
        self.opt.zero_grad()
        for g in self.opt.param_groups:
            g["lr"] = lr
        return beat_phase_loss(self.head, hidden, picks, starts, keep, frames, frame_rate)

    def step(self):
        self.opt.step()
        # Optimizer.state_dict() packs the state when called (empty before the first step):
        # refresh it so the checkpoint Trainer writes carries the head's current moments
        self.extra["beat_opt"] = self.opt.state_dict()

# ----------------------------------------------------------------------------- captions / text encoder

def build_caption_tokenizer(captions: list[str], vocab_size: int, words: bool = False):
    """A T5-style Unigram tokenizer (<pad>=0, </s>=1, <unk>=2; appends </s>) trained on the captions.

    Same pipeline as tools/fixtures/musicgen.py (NFKC + Strip, Metaspace): no regex, so the Rust
    `tokenizers` crate reads it without onig.

    `words=False` (what the first musicgen-tiny / magnet-tiny were trained with) runs
    `tokenizers`' UnigramTrainer, which on this small closed caption language stops at about
    100 pieces whatever `vocab_size` asks: mostly single letters ("cello" -> c e l l o, "150"
    -> 15 0). `words=True` builds the Unigram model directly instead: every caption word is one
    piece scored by its log frequency (so "cello", "150" and "bpm" are single tokens), plus every
    character at a low score so unseen words still spell out; `vocab_size` is then unused.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                           normalizers.Strip(left=True, right=True)])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    if words:
        count: dict[str, int] = {}
        for c in captions:
            for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(c)):
                count[w] = count.get(w, 0) + 1
        total = sum(count.values())
        pieces = sorted(count.items(), key=lambda kv: (-kv[1], kv[0]))
        chars = sorted({ch for w in count for ch in w} - set(count))
        vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
        vocab += [(w, math.log(n / total)) for w, n in pieces] + [(ch, -30.0) for ch in chars]
        tok.model = models.Unigram(vocab, unk_id=2, byte_fallback=False)
    else:
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                          unk_token="<unk>", show_progress=False)
        tok.train_from_iterator(sorted(set(captions)), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1
    return tok


def encode_captions(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encs = tok.encode_batch(texts)
    n = max(len(e.ids) for e in encs)
    ids = torch.zeros(len(texts), n, dtype=torch.long)
    mask = torch.zeros(len(texts), n, dtype=torch.long)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    return ids, mask


def t5_config(vocab_size: int, d_model: int, layers: int):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model,
                    num_layers=layers, num_decoder_layers=layers, num_heads=4, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, dropout_rate=0.1, feed_forward_proj="relu",
                    is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)


# ----------------------------------------------------------------------------- codec tokens

@torch.no_grad()
def codec_tokens(codec_dir: Path, rows: list[dict], cache: Path) -> dict:
    """Encode every clip with the trained codec once: {path: LongTensor[K, T]}, cached in `cache`."""
    from transformers import EncodecModel

    st = (codec_dir / "model.safetensors").stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}"  # a retrained codec invalidates the cache
    if cache.exists():
        got = torch.load(cache)
        if got.get("__codec__") == stamp and all(r["path"] in got for r in rows):
            return got
    model = EncodecModel.from_pretrained(codec_dir).eval()
    sr = model.config.sampling_rate
    out = {"__codec__": stamp}
    t0 = time.time()
    for i, r in enumerate(rows):
        x = torch.from_numpy(load_audio(r["path"], sr))[None, None]
        out[r["path"]] = model.encode(x).audio_codes[0, 0].clone()  # [K, T]
        if i % 200 == 0:
            print(f"tokenised {i}/{len(rows)} ({time.time() - t0:.0f} s)", flush=True)
    torch.save(out, cache)
    return out


def import_audiocraft():
    from musicgen_audiocraft import _import_audiocraft  # tools/fixtures/musicgen_audiocraft.py

    return _import_audiocraft()

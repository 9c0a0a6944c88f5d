#!/usr/bin/env python3
"""An instrument judge for generated music: which of the captions' lead instruments is playing?

    /work/venv/ref/bin/python training/eval/instrument_judge.py --codec CODEC_DIR \
        --manifest data/music/manifest.jsonl --out judge.pt

A multinomial logistic regression on clip-level log-mel statistics (mean and standard deviation
of 64 bands, and of their frame-to-frame differences, at 22.05 kHz). It is trained on the
*codec reconstructions* of the training clips, because generated music comes out of the same
codec decoder and the codec changes the timbre (a judge trained on the clean renders would
mostly measure the codec). Reports its own accuracy on the reconstructions of the test clips
(the ceiling a generator can be held to) and saves itself to --out. `music_eval.py
--instrument-judge OUT` then scores generated clips with it.

Chance level: 12 instruments, the most common one (piano) is 11.6% of the clips.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import codec_tokens, load_audio, read_manifest, resample  # noqa: E402

SR = 22050


def features(y: np.ndarray, sr: int = SR) -> np.ndarray:
    import librosa

    m = np.log(librosa.feature.melspectrogram(y=y, sr=sr, n_fft=2048, hop_length=512, n_mels=64) + 1e-6)
    d = np.diff(m, axis=1)
    return np.concatenate([m.mean(1), m.std(1), np.abs(d).mean(1), d.std(1)]).astype(np.float32)


class Judge:
    def __init__(self, classes: list[str], mu: torch.Tensor, sd: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
        self.classes, self.mu, self.sd, self.w, self.b = classes, mu, sd, w, b

    @staticmethod
    def fit(x: np.ndarray, labels: list[str], l2: float = 1e-3) -> "Judge":
        classes = sorted(set(labels))
        X = torch.from_numpy(x)
        mu, sd = X.mean(0), X.std(0) + 1e-5
        X = (X - mu) / sd
        y = torch.tensor([classes.index(s) for s in labels])
        w = torch.zeros(X.shape[1], len(classes), requires_grad=True)
        b = torch.zeros(len(classes), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(X @ w + b, y) + l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return Judge(classes, mu, sd, w.detach(), b.detach())

    def predict(self, x: np.ndarray) -> list[str]:
        X = (torch.from_numpy(np.atleast_2d(x)) - self.mu) / self.sd
        return [self.classes[i] for i in (X @ self.w + self.b).argmax(1).tolist()]

    def save(self, path: Path) -> None:
        torch.save(dict(classes=self.classes, mu=self.mu, sd=self.sd, w=self.w, b=self.b), path)

    @staticmethod
    def load(path: Path) -> "Judge":
        d = torch.load(path)
        return Judge(d["classes"], d["mu"], d["sd"], d["w"], d["b"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codec", type=Path, required=True, help="HF EnCodec dir the generators decode with")
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--max-train", type=int, default=600, help="training clips used (decoding is the cost)")
    ap.add_argument("--seconds", type=float, default=5.0, help="decode this much of each clip")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import EncodecModel

    rows = read_manifest(args.manifest)
    import random

    train_all = [r for r in rows if r["split"] == "train"]
    keep = {r["path"] for r in random.Random(0).sample(train_all, min(args.max_train, len(train_all)))}
    rows = [r for r in rows if r["split"] == "test" or r["path"] in keep]
    codec = EncodecModel.from_pretrained(args.codec).eval()
    sr = codec.config.sampling_rate
    # the same token cache the LM recipes use (CODEC/../music_codes.pt), made if missing
    codes = codec_tokens(args.codec, read_manifest(args.manifest), args.codec.parent / "music_codes.pt")
    feats = {}
    frames = int(args.seconds * codec.config.frame_rate)
    for i, r in enumerate(rows):
        with torch.no_grad():
            y = codec.decode(codes[r["path"]][None, None, :, :frames], [None]).audio_values[0, 0].numpy()
        feats[r["path"]] = features(resample(y, sr, SR))
        if i % 200 == 0:
            print(f"decoded {i}/{len(rows)}", file=sys.stderr, flush=True)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    judge = Judge.fit(np.stack([feats[r["path"]] for r in train]), [r["attributes"]["instrument"] for r in train], args.l2)
    judge.save(args.out)

    def acc(rs, f):
        pred = judge.predict(np.stack([f(r) for r in rs]))
        return round(float(np.mean([p == r["attributes"]["instrument"] for p, r in zip(pred, rs)])), 3)

    report = dict(classes=judge.classes, train_clips=len(train), test_clips=len(test),
                  train_acc_codec=acc(train, lambda r: feats[r["path"]]),
                  test_acc_codec=acc(test, lambda r: feats[r["path"]]),
                  test_acc_original=acc(test, lambda r: features(load_audio(r["path"], SR)[: int(args.seconds * SR)])),
                  chance_majority=round(max(np.mean([r["attributes"]["instrument"] == c for r in test]) for c in judge.classes), 3))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

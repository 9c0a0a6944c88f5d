#!/usr/bin/env python3
"""A held-out-voice VALIDATION set for choosing ASR checkpoints without touching the test voices.

    /work/venv/ref/bin/python training/eval/asr_val_set.py --speech DATA/speech --out DATA/val [--n 150]

Speaks the first N dev sentences (held-out text) with three espeak-ng variants that are in
neither the training voices nor the test voices of `training/data/speech.py` (en-us+m8,
en-gb+klatt4, en-gb-scotland+Andy; none of the test voices' variants m6, f5, klatt2), through
the generator's own `synth` (same rate/pitch ranges, EQ and noise). Writes OUT/manifest.jsonl
(split "val") and OUT/wav/. Score with `asr_eval.py --manifest OUT/manifest.jsonl --split val`.

`--engine-voice` speaks the same sentences with `speech.VAL_ENGINE_VOICE` instead (SVOX Pico
en-GB: an engine voice kept out of training, as the test set's flite rms is), for a second
validation set on an unseen synthesis engine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import speech  # noqa: E402
from common import read_manifest  # noqa: E402

VOICES = ["espeak:en-us+m8", "espeak:en-gb+klatt4", "espeak:en-gb-scotland+Andy"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speech", type=Path, required=True, help="the speech generator's output (its manifest.jsonl)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--engine-voice", action="store_true", help=f"speak with {speech.VAL_ENGINE_VOICE} only")
    args = ap.parse_args()
    voices = [speech.VAL_ENGINE_VOICE] if args.engine_voice else VOICES
    assert not set(voices) & set(speech.voices() + speech.HELD_OUT + speech.EXTRA)
    rows = read_manifest(args.speech / "manifest.jsonl", "dev")[: args.n]
    (args.out / "wav").mkdir(parents=True, exist_ok=True)
    out = []
    for i, r in enumerate(rows):
        job = dict(voice=voices[i % len(voices)], speak=r["text"], text=r["text"], seed=1000 + i,
                   path=f"wav/val_{i:04d}.wav", abs=str(args.out / f"wav/val_{i:04d}.wav"), split="val")
        res = speech.synth(job)
        if res and "failed" not in res:
            res.pop("abs")
            out.append(res)
    (args.out / "manifest.jsonl").write_text("".join(json.dumps(o) + "\n" for o in out))
    print(json.dumps(dict(utterances=len(out), voices=voices)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Synthetic English speech with exact transcripts (16 kHz mono WAV + manifest.jsonl).

    nice -n 19 /work/venv/ref/bin/python training/data/speech.py --out data/speech --n 20000

Voices: espeak-ng (formant, several accents x variants) and flite (kal16, kal, awb, rms, slt),
each utterance with random rate, pitch, light EQ and noise. `--extra N` adds N training
utterances by other engines (EXTRA below: Festival diphone and HTS voices, SVOX Pico), drawn from
their own random stream, so the base set stays identical; `--extra-only` writes just those and
merges them into an existing OUT/manifest.jsonl. Text: Debian `fortunes` sentences,
WordNet usage examples, and number / date / time readings. Deterministic from --seed.

Splits (field `split`):
  train  training voices, training sentences
  dev    training voices, held-out sentences
  test   HELD-OUT VOICES (see HELD_OUT below), held-out sentences
Transcripts are lower case `a-z`, apostrophe and single spaces (what the ASR vocabulary holds).
Needs: apt-get install espeak-ng flite fortunes fortunes-min wordnet-base; for --extra also
festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts and `pip install ttspico`
(SVOX Pico, Apache-2.0, with its en-US / en-GB lingware).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import lfilter, resample_poly

SR = 16000
ESPEAK_BASE = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan"]
ESPEAK_VARIANTS = ["", "m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "klatt", "klatt3", "croak"]
FLITE = ["kal16", "kal", "awb", "rms", "slt"]
# Whole voices never seen in training (test split only).
HELD_OUT = ["espeak:en-us+f5", "espeak:en-gb-x-rp+m6", "espeak:en-029+klatt2", "flite:rms"]
# Other engines, for --extra training utterances. pico:en-GB is kept out of training: it is the
# unseen-engine voice of the validation set (training/eval/asr_val_set.py --engine-voice).
EXTRA = ["festival:kal_diphone", "festival:ked_diphone", "festival:cmu_us_slt_arctic_hts", "pico:en-US"]
VAL_ENGINE_VOICE = "pico:en-GB"


def voices() -> list[str]:
    v = [f"espeak:{b}+{x}" if x else f"espeak:{b}" for b in ESPEAK_BASE for x in ESPEAK_VARIANTS]
    v += [f"flite:{f}" for f in FLITE]
    return [x for x in v if x not in HELD_OUT]


# ----------------------------------------------------------------------------- text

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
       "sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
MONTHS = "january february march april may june july august september october november december".split()
ORD = {1: "first", 2: "second", 3: "third", 5: "fifth", 8: "eighth", 9: "ninth", 12: "twelfth"}


def num_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " and " + num_words(n % 100))
    if n < 1_000_000:
        return num_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + num_words(n % 1000))
    return num_words(n // 1_000_000) + " million" + ("" if n % 1_000_000 == 0 else " " + num_words(n % 1_000_000))


def ordinal(n: int) -> str:
    if n in ORD:
        return ORD[n]
    if n < 20:
        return ONES[n] + "th"
    if n % 10 == 0:
        return TENS[n // 10][:-1] + "ieth"
    return TENS[n // 10] + " " + ordinal(n % 10)


def number_sentences(rng: np.random.Generator, n: int) -> list[str]:
    out = []
    for i in range(n):
        k = i % 5
        if k == 0:
            out.append(" ".join(ONES[int(d)] for d in rng.integers(0, 10, int(rng.integers(3, 8)))))
        elif k == 1:
            out.append(f"the total is {num_words(int(rng.integers(0, 100000)))}")
        elif k == 2:
            out.append(f"{MONTHS[int(rng.integers(12))]} {ordinal(int(rng.integers(1, 29)))} "
                       f"nineteen {num_words(int(rng.integers(20, 100)))}")
        elif k == 3:
            h, m = int(rng.integers(1, 13)), int(rng.integers(0, 60))
            mm = "o'clock" if m == 0 else ("oh " + ONES[m] if m < 10 else num_words(m))
            out.append(f"the meeting starts at {num_words(h)} {mm}")
        else:
            out.append(f"turn to page {num_words(int(rng.integers(1, 600)))} and read line {num_words(int(rng.integers(1, 40)))}")
    return out


CLEAN = re.compile(r"^[A-Za-z][A-Za-z ,.'!?;:-]+$")  # starts with a letter: no "-- Author" attributions


def normalize(s: str) -> str:
    s = s.lower().replace("-", " ")
    s = re.sub(r"[^a-z' ]", " ", s)
    s = re.sub(r"(^| )'+|'+( |$)", " ", s)
    return re.sub(r" +", " ", s).strip()


def text_sentences() -> list[tuple[str, str]]:
    """(source, sentence) from fortunes and WordNet examples, 5-15 words, clean characters."""
    out = []
    for f in sorted(glob.glob("/usr/share/games/fortunes/*")):
        if "." in os.path.basename(f) or os.path.isdir(f):
            continue
        text = open(f, encoding="latin-1").read()
        for para in text.split("\n%\n"):
            for sent in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
                if CLEAN.match(sent) and 5 <= len(sent.split()) <= 15:
                    out.append(("fortunes", sent))
    for f in sorted(glob.glob("/usr/share/wordnet/data.*")):
        for line in open(f, encoding="latin-1"):
            for ex in re.findall(r'"([^"]+)"', line):
                if CLEAN.match(ex) and 5 <= len(ex.split()) <= 15:
                    out.append(("wordnet", ex))
    seen, uniq = set(), []
    for src, s in out:
        n = normalize(s)
        if n and n not in seen:
            seen.add(n)
            uniq.append((src, s))
    return uniq


def heldout_text(s: str) -> bool:
    return int(hashlib.md5(normalize(s).encode()).hexdigest(), 16) % 20 == 0  # 5% of sentences


def text_pool(rng: np.random.Generator, n: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) lists of (source, sentence): fortunes, WordNet and `rng`'s number
    readings for a run of `n` training utterances, split by `heldout_text`."""
    sents = text_sentences()
    nums = number_sentences(rng, max(200, n // 8))
    pool = [(s, t) for s, t in sents] + [("numbers", t) for t in nums]
    return [p for p in pool if not heldout_text(p[1])], [p for p in pool if heldout_text(p[1])]


# ----------------------------------------------------------------------------- synthesis

_PICO: dict = {}


def pico_wav(lang: str, text: str, speed: int, pitch: int, wav: str) -> None:
    """SVOX Pico (the `ttspico` wheel) at 16 kHz, with its own speed/pitch markup (percent)."""
    import ttspico
    if lang not in _PICO:
        _PICO[lang] = ttspico.TtsEngine(lang)
    esc = text.replace("&", " and ").replace("<", " ").replace(">", " ")
    pcm = _PICO[lang].speak(f'<speed level="{speed}"><pitch level="{pitch}">{esc}</pitch></speed>') or b""
    sf.write(wav, np.frombuffer(pcm, dtype=np.int16), 16000, subtype="PCM_16")


def synth(job: dict) -> dict | None:
    rng = np.random.default_rng(job["seed"])
    engine, voice = job["voice"].split(":")
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "a.wav")
        text = job["speak"]
        if engine == "pico":
            speed, pitch = int(rng.integers(75, 135)), int(rng.integers(75, 130))
            job.update(rate=speed, pitch=pitch)
            cmd, rc, err = None, 0, ""
            try:
                pico_wav(voice, text, speed, pitch, wav)
            except Exception as e:  # noqa: BLE001 - reported per utterance, like a failed subprocess
                rc, err = 1, str(e)
        elif engine == "festival":
            stretch = float(rng.uniform(0.85, 1.2))
            txt = os.path.join(tmp, "a.txt")
            Path(txt).write_text(text + "\n")
            cmd = ["text2wave", "-o", wav, "-eval", f"(voice_{voice})",
                   "-eval", f"(Parameter.set 'Duration_Stretch {stretch:.3f})", txt]
            job.update(stretch=round(stretch, 3))
        elif engine == "espeak":
            rate, pitch = int(rng.integers(130, 210)), int(rng.integers(25, 75))
            cmd = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", wav, text]
            job.update(rate=rate, pitch=pitch)
        else:
            stretch = float(rng.uniform(0.85, 1.2))
            f0 = float(rng.uniform(0.85, 1.15))
            base = 170 if voice == "slt" else 105
            cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={stretch:.3f}",
                   "--setf", f"int_f0_target_mean={base * f0:.1f}", "-t", text, "-o", wav]
            job.update(stretch=round(stretch, 3), f0_scale=round(f0, 3))
        if cmd is not None:
            r = subprocess.run(cmd, capture_output=True)
            rc, err = r.returncode, r.stderr.decode(errors="replace")
        if rc != 0 or not os.path.exists(wav):
            return dict(failed=job["path"], voice=job["voice"], reason=err[-200:])
        x, sr = sf.read(wav, dtype="float32", always_2d=True)
    x = x.mean(1)
    if sr != SR:
        g = np.gcd(sr, SR)
        x = resample_poly(x, SR // g, sr // g).astype(np.float32)
    # trim long silences at the ends (keep 0.1 s)
    nz = np.nonzero(np.abs(x) > 1e-3)[0]
    if len(nz) == 0:
        return dict(failed=job["path"], voice=job["voice"], reason="silent output", text=job["speak"])
    x = x[max(0, nz[0] - 1600): nz[-1] + 1600]
    # light EQ: one-pole low-pass or pre-emphasis, random amount
    a = float(rng.uniform(-0.5, 0.5))
    x = lfilter([1.0 - abs(a)], [1.0, -abs(a)], x) if a > 0 else lfilter([1.0, a], [1.0], x)
    x = x / (np.abs(x).max() + 1e-9) * float(rng.uniform(0.3, 0.9))
    snr = float(rng.uniform(20, 45))
    x = x + rng.standard_normal(len(x)) * np.sqrt(np.mean(x ** 2) / 10 ** (snr / 10))
    x = np.clip(x, -1, 1).astype(np.float32)
    sf.write(job["abs"], x, SR, subtype="PCM_16")
    job.update(eq=round(a, 3), snr_db=round(snr, 1), seconds=round(len(x) / SR, 3))
    return job


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=20000, help="utterances in train (dev/test add ~10%%)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--flite-share", type=float, default=0.3,
                    help="share of train/dev utterances spoken by flite voices (5 of the 88 voices)")
    ap.add_argument("--extra", type=int, default=0, help="extra training utterances by the EXTRA voices")
    ap.add_argument("--extra-only", action="store_true",
                    help="write only the --extra utterances and merge them into OUT/manifest.jsonl")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    train_text, held_text = text_pool(rng, args.n)
    vs = voices()
    n_dev = n_test = max(20, args.n // 20)
    plan = [("train", train_text, vs, args.n), ("dev", held_text, vs, n_dev), ("test", held_text, HELD_OUT, n_test)]
    (args.out / "wav").mkdir(parents=True, exist_ok=True)
    jobs = []
    for split, texts, vlist, n in plan:
        for i in range(n):
            src, t = texts[int(rng.integers(len(texts)))]
            if vlist is vs:  # train / dev: flite gets --flite-share, espeak the rest
                fl = [v for v in vs if v.startswith("flite:")]
                es = [v for v in vs if not v.startswith("flite:")]
                pool_v = fl if rng.random() < args.flite_share else es
                voice = pool_v[int(rng.integers(len(pool_v)))]
            else:
                voice = vlist[int(rng.integers(len(vlist)))]
            name = f"wav/{split}_{i:06d}.wav"
            jobs.append(dict(path=name, abs=str(args.out / name), text=normalize(t), speak=t, source=src,
                             voice=voice, split=split, seed=int(rng.integers(2**31))))
    if args.extra_only:
        jobs = []
    xrng = np.random.default_rng([args.seed, 1])  # its own stream: the base plan above is unchanged
    for i in range(args.extra):
        src, t = train_text[int(xrng.integers(len(train_text)))]
        name = f"wav/trainx_{i:06d}.wav"
        jobs.append(dict(path=name, abs=str(args.out / name), text=normalize(t), speak=t, source=src,
                         voice=EXTRA[int(xrng.integers(len(EXTRA)))], split="train",
                         seed=int(xrng.integers(2**31))))
    t0 = time.time()
    rows, failed = [], []
    with ProcessPoolExecutor(args.jobs) as ex:
        for r in ex.map(synth, jobs, chunksize=16):
            if "failed" in r:
                failed.append(r)
            else:
                r.pop("abs"), r.pop("seed")
                rows.append(r)
    el = time.time() - t0
    if args.extra_only:  # keep the existing base rows, replace any earlier extras
        old = [json.loads(x) for x in (args.out / "manifest.jsonl").read_text().splitlines() if x.strip()]
        rows += [r for r in old if not r["path"].startswith("wav/trainx_")]
    rows.sort(key=lambda r: r["path"])
    with open(args.out / "manifest.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    audio = sum(r["seconds"] for r in rows)
    info = dict(utterances=len(rows), audio_hours=round(audio / 3600, 3), wall_s=round(el, 1),
                realtime_factor=round(audio / el, 1), train_text=len(train_text), heldout_text=len(held_text),
                voices_train=len(vs) + (len(EXTRA) if args.extra else 0), voices_heldout=HELD_OUT,
                extra=args.extra,
                per_split={s: sum(r["split"] == s for r in rows) for s in ("train", "dev", "test")},
                failed=failed)
    (args.out / "info.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

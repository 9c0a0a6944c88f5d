#!/usr/bin/env python3
"""Music clips with exact captions (32 kHz mono WAV + manifest.jsonl).

    nice -n 19 /work/venv/ref/bin/python training/data/music.py --out data/music --n 4000

Two sources, each note known exactly:
  * procedural MIDI: key (12 tonics x major/minor), tempo 60-160 bpm, meter 3/4 or 4/4, lead
    instrument (GM program), style (folk tune, waltz, march, ballad, arpeggios), optional bass,
    chords and drums;
  * the music21 score corpus (Bach chorales, Ryan's Mammoth / O'Neill folk tunes in ABC), with the
    key analysed from the score and a chosen tempo and instrument.
Rendered with the fluidsynth CLI through a Debian SoundFont (TimGM6mb by default) at 32 kHz, the
rate of the codec recipe (training/codec.py) and of MusicGen's EnCodec. Captions are built from
the attributes ("solo flute folk tune in D major at 100 bpm"). Deterministic from --seed.
Splits: train / test (5%, by hash of the clip id; the test captions are the music eval prompts).
Needs: apt-get install fluidsynth timgm6mb-soundfont; pip install music21 pretty_midi.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 32000
SOUNDFONT = "/usr/share/sounds/sf2/TimGM6mb.sf2"
NAMES = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
MAJOR = [0, 2, 4, 5, 7, 9, 11]
MINOR = [0, 2, 3, 5, 7, 8, 10]
INSTRUMENTS = {  # caption word -> (GM program, lowest, highest MIDI note for the lead)
    "piano": (0, 55, 84), "organ": (19, 55, 84), "acoustic guitar": (24, 52, 79), "violin": (40, 60, 88),
    "cello": (42, 40, 67), "strings": (48, 55, 84), "trumpet": (56, 58, 82), "clarinet": (71, 52, 82),
    "flute": (73, 62, 91), "marimba": (12, 55, 84), "harp": (46, 52, 84), "saxophone": (65, 52, 77),
}
STYLES = ["folk tune", "waltz", "march", "ballad", "arpeggio study"]


def key_name(tonic: int, mode: str) -> str:
    return f"{NAMES[tonic]} {mode}"


def caption(a: dict) -> str:
    parts = [a["ensemble"], a["instrument"], a["style"], f"in {key_name(a['tonic'], a['mode'])}", f"at {a['bpm']} bpm"]
    if a.get("meter"):
        parts.insert(3, f"in {a['meter']}")
    extras = [x for x in ("bass", "drums") if a.get(x)]
    s = " ".join(p for p in parts if p)
    return s + (" with " + " and ".join(extras) if extras else "")


# ----------------------------------------------------------------------------- procedural

def procedural(rng: np.random.Generator, seconds: float) -> tuple[list, dict]:
    """-> notes [(program or 'drum', pitch, start_s, end_s, velocity)], attributes."""
    tonic, mode = int(rng.integers(12)), ["major", "minor"][int(rng.integers(2))]
    style = STYLES[int(rng.integers(len(STYLES)))]
    meter = {"waltz": 3, "march": 4}.get(style, [3, 4][int(rng.integers(2))])
    lo_bpm, hi_bpm = {"ballad": (60, 90), "march": (100, 140), "waltz": (80, 150)}.get(style, (70, 160))
    bpm = int(rng.integers(lo_bpm // 5, hi_bpm // 5 + 1)) * 5
    inst = list(INSTRUMENTS)[int(rng.integers(len(INSTRUMENTS)))]
    prog, lo, hi = INSTRUMENTS[inst]
    bass, drums = bool(rng.random() < 0.6), bool(rng.random() < 0.4 and style != "ballad")
    scale = MAJOR if mode == "major" else MINOR
    beat = 60.0 / bpm
    n_bars = max(2, int(seconds / (beat * meter)))
    prog_deg = [[0, 3, 4, 0], [0, 5, 3, 4], [0, 4, 5, 3], [0, 3, 0, 4]][int(rng.integers(4))]
    centre = lo + ((tonic - lo) % 12) + 12 * ((hi - lo) // 24)
    pitches = [centre + 12 * o + scale[d] - scale[0] for o in (-1, 0, 1) for d in range(7)]
    pitches = sorted(p for p in pitches if lo <= p <= hi) or [centre]
    notes = []
    idx = len(pitches) // 2
    vel = int(rng.integers(70, 110))
    for bar in range(n_bars):
        t0 = bar * meter * beat
        root_deg = prog_deg[bar % 4]
        chord = [scale[(root_deg + k) % 7] + 12 * ((root_deg + k) // 7) for k in (0, 2, 4)]
        if style == "arpeggio study":
            rhythm = [0.5] * (2 * meter)
        elif style == "march":
            rhythm = [1.0] * meter if rng.random() < 0.5 else [0.5, 0.5] + [1.0] * (meter - 1)
        elif style == "waltz":
            rhythm = [2.0, 1.0] if rng.random() < 0.5 else [1.0, 1.0, 1.0]
        elif style == "ballad":
            rhythm = [2.0] * (meter // 2) + [1.0] * (meter % 2)
        else:
            rhythm = [[1.0, 0.5, 0.5], [0.5, 0.5, 1.0], [1.0]][int(rng.integers(3))] * meter
            acc, r2 = 0.0, []
            for r in rhythm:
                if acc + r <= meter:
                    r2.append(r)
                    acc += r
            rhythm = r2 + ([meter - acc] if acc < meter else [])
        t = t0
        for i, r in enumerate(rhythm):
            if style == "arpeggio study":
                p = tonic + 60 + chord[i % 3] + (12 if (i // 3) % 2 else 0)
                while p > hi:
                    p -= 12
                while p < lo:
                    p += 12
            else:
                if i == 0:  # land on a chord tone at the downbeat
                    targets = [j for j, q in enumerate(pitches) if (q - tonic) % 12 in {c % 12 for c in chord}]
                    idx = min(targets, key=lambda j: abs(j - idx)) if targets else idx
                else:
                    idx = int(np.clip(idx + rng.choice([-2, -1, -1, 0, 1, 1, 2]), 0, len(pitches) - 1))
                p = pitches[idx]
            accent = 12 if i == 0 else 0
            notes.append((prog, p, t, t + r * beat * 0.95, min(127, vel + accent)))
            t += r * beat
        if bass:
            bp = 36 + (tonic + chord[0]) % 12
            for b in range(meter):
                if b == 0 or (style in ("march", "waltz", "folk tune")):
                    q = bp if b == 0 or style != "waltz" else bp + 12 + chord[1] - chord[0]
                    notes.append((32, q, t0 + b * beat, t0 + (b + 1) * beat * 0.9, 90 if b == 0 else 70))
        if drums:
            for b in range(meter):
                notes.append(("drum", 36 if b == 0 or (meter == 4 and b == 2) else 38, t0 + b * beat, t0 + b * beat + 0.1, 100 if b == 0 else 80))
                notes.append(("drum", 42, t0 + (b + 0.5) * beat, t0 + (b + 0.5) * beat + 0.05, 60))
    attrs = dict(source="procedural", tonic=tonic, mode=mode, bpm=bpm, meter=f"{meter}/4", instrument=inst,
                 style=style, bass=bass, drums=drums, ensemble="solo" if not (bass or drums) else "")
    return notes, attrs


# ----------------------------------------------------------------------------- music21 corpus

def corpus_paths() -> list[str]:
    from music21 import corpus

    out = []
    for p in corpus.getPaths():
        s = str(p)
        if "/bach/" in s and s.endswith((".mxl", ".xml", ".musicxml")):
            out.append(s)
        elif "/ryansMammoth/" in s or "/oneills1850/" in s:
            out.append(s)
    return sorted(out)


def from_corpus(rng: np.random.Generator, path: str, seconds: float) -> tuple[list, dict] | None:
    from music21 import converter

    try:
        s = converter.parse(path)
        if hasattr(s, "scores") and len(s.scores):  # ABC books parse to an Opus
            s = s.scores[int(rng.integers(len(s.scores)))]
        k = s.analyze("key")
    except Exception:
        return None
    chorale = "/bach/" in path
    bpm = int(rng.integers(12, 25)) * 5 if not chorale else int(rng.integers(12, 19)) * 5
    beat = 60.0 / bpm
    inst = ["organ", "strings", "piano"][int(rng.integers(3))] if chorale else \
        ["flute", "violin", "acoustic guitar", "piano", "clarinet", "harp"][int(rng.integers(6))]
    prog = INSTRUMENTS[inst][0]
    notes = []
    for n in s.flatten().notes:
        t = float(n.getOffsetInHierarchy(s)) * beat
        if t >= seconds:
            continue
        d = max(0.05, float(n.duration.quarterLength) * beat * 0.95)
        for p in n.pitches:
            notes.append((prog, int(p.midi), t, min(t + d, seconds + 1), 90))
    if len(notes) < 8:
        return None
    ts = s.flatten().getElementsByClass("TimeSignature")
    meter = ts[0].ratioString if len(ts) else ""
    tonic = NAMES.index(k.tonic.name.replace("-", "b").replace("Db", "C#").replace("D#", "Eb").replace("Gb", "F#")
                        .replace("G#", "Ab").replace("A#", "Bb").replace("Cb", "B").replace("E#", "F").replace("B#", "C").replace("Fb", "E")) \
        if k.tonic.name.replace("-", "b") else 0
    attrs = dict(source="music21:" + path.split("/corpus/")[1], tonic=tonic, mode=k.mode, bpm=bpm, meter=meter,
                 instrument=inst, style="chorale" if chorale else "folk tune", bass=False, drums=False,
                 ensemble="" if chorale else "solo")
    return notes, attrs


# ----------------------------------------------------------------------------- rendering

def render(job: dict) -> dict | None:
    import pretty_midi

    rng = np.random.default_rng(job["seed"])
    if job["kind"] == "procedural":
        got = procedural(rng, job["seconds"])
    else:
        got = from_corpus(rng, job["kind"], job["seconds"])
    if got is None:
        return None
    notes, attrs = got
    pm = pretty_midi.PrettyMIDI(initial_tempo=attrs["bpm"])
    insts = {}
    for prog, p, t0, t1, v in notes:
        if prog not in insts:
            insts[prog] = pretty_midi.Instrument(program=0 if prog == "drum" else prog, is_drum=prog == "drum")
        insts[prog].notes.append(pretty_midi.Note(velocity=v, pitch=int(p), start=float(t0), end=float(t1)))
    pm.instruments = list(insts.values())
    with tempfile.TemporaryDirectory() as tmp:
        mid, wav = os.path.join(tmp, "a.mid"), os.path.join(tmp, "a.wav")
        pm.write(mid)
        r = subprocess.run(["fluidsynth", "-ni", "-g", "0.6", "-r", str(SR), "-F", wav, job["soundfont"], mid],
                           capture_output=True)
        if r.returncode != 0:
            return None
        x, sr = sf.read(wav, dtype="float32", always_2d=True)
    x = x.mean(1)[: int(job["seconds"] * SR)]
    if np.abs(x).max() < 1e-3:
        return None
    x = x / np.abs(x).max() * 0.8
    sf.write(job["abs"], x, SR, subtype="PCM_16")
    attrs["tonic_name"] = NAMES[attrs["tonic"]]
    return dict(path=job["path"], text=caption(attrs), attributes=attrs, split=job["split"],
                seconds=round(len(x) / SR, 3))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=4000, help="clips (all splits)")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length")
    ap.add_argument("--corpus-fraction", type=float, default=0.3, help="share of music21 corpus clips")
    ap.add_argument("--soundfont", default=SOUNDFONT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    paths = corpus_paths()
    (args.out / "wav").mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(args.n):
        kind = paths[int(rng.integers(len(paths)))] if rng.random() < args.corpus_fraction else "procedural"
        cid = f"{i:06d}"
        split = "test" if int(hashlib.md5(f"{args.seed}:{cid}".encode()).hexdigest(), 16) % 20 == 0 else "train"
        jobs.append(dict(kind=kind, seed=int(rng.integers(2**31)), seconds=args.seconds, split=split,
                         path=f"wav/{cid}.wav", abs=str(args.out / f"wav/{cid}.wav"), soundfont=args.soundfont))
    t0 = time.time()
    with ProcessPoolExecutor(args.jobs) as ex:
        rows = [r for r in ex.map(render, jobs, chunksize=8) if r is not None]
    el = time.time() - t0
    with open(args.out / "manifest.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    audio = sum(r["seconds"] for r in rows)
    info = dict(clips=len(rows), audio_hours=round(audio / 3600, 3), wall_s=round(el, 1),
                realtime_factor=round(audio / el, 1), corpus_files=len(paths),
                per_split={s: sum(r["split"] == s for r in rows) for s in ("train", "test")},
                per_source={s: sum(r["attributes"]["source"].split(":")[0] == s for r in rows) for s in ("procedural", "music21")})
    (args.out / "info.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

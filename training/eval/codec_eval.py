#!/usr/bin/env python3
"""SI-SDR and log-mel distance of a codec's reconstructions (HF EnCodec directory).

    /work/venv/ref/bin/python training/eval/codec_eval.py --model DIR --manifest data/music/manifest.jsonl \
        [--split test] [--limit 50] [--write-decoded OUTDIR]

--write-decoded writes the decoded clips (at the manifest's own rate) plus a manifest.jsonl, so
asr_eval.py can measure ASR CER on codec-decoded speech against the originals. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import load_audio, read_manifest, resample, write_manifest  # noqa: E402


def si_sdr(ref: np.ndarray, est: np.ndarray) -> float:
    ref, est = ref - ref.mean(), est - est.mean()
    a = np.dot(est, ref) / (np.dot(ref, ref) + 1e-9)
    t = a * ref
    return float(10 * np.log10((t ** 2).sum() / (((est - t) ** 2).sum() + 1e-9) + 1e-9))


def mel_distance(ref: np.ndarray, est: np.ndarray, sr: int) -> float:
    import librosa

    a = librosa.feature.melspectrogram(y=ref, sr=sr, n_fft=1024, hop_length=256, n_mels=64)
    b = librosa.feature.melspectrogram(y=est, sr=sr, n_fft=1024, hop_length=256, n_mels=64)
    return float(np.abs(np.log(a + 1e-5) - np.log(b + 1e-5)).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--write-decoded", type=Path, default=None)
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="kbps, one of the model's target_bandwidths (default: the highest)")
    ap.add_argument("--unquantized", action="store_true",
                    help="diagnostic: decode the encoder's continuous output, skipping the RVQ "
                         "(the ceiling any bandwidth of this encoder/decoder pair can reach)")
    args = ap.parse_args()
    from transformers import EncodecModel

    torch.set_num_threads(2)
    model = EncodecModel.from_pretrained(args.model).eval()
    sr = model.config.sampling_rate
    kbps = args.bandwidth if args.bandwidth is not None else model.config.target_bandwidths[-1]
    assert kbps in model.config.target_bandwidths, f"{kbps} kbps: not in {model.config.target_bandwidths}"
    rows = read_manifest(args.manifest, args.split)[: args.limit]
    res, out_rows = [], []
    if args.write_decoded:
        (args.write_decoded / "wav").mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(rows):
        x = load_audio(r["path"], sr)
        with torch.no_grad():
            wav = torch.from_numpy(x)[None, None]
            if args.unquantized:
                y = model.decoder(model.encoder(wav))[0, 0, : len(x)].numpy()
            else:
                codes = model.encode(wav, bandwidth=kbps).audio_codes
                y = model.decode(codes, [None]).audio_values[0, 0, : len(x)].numpy()
        res.append(dict(si_sdr=si_sdr(x, y), mel=mel_distance(x, y, sr)))
        if args.write_decoded:
            native = sf.info(r["path"]).samplerate
            z = resample(y, sr, native)
            name = f"wav/{i:05d}.wav"
            sf.write(args.write_decoded / name, np.clip(z, -1, 1), native, subtype="PCM_16")
            out_rows.append(dict(r, path=name))
    if args.write_decoded:
        write_manifest(args.write_decoded / "manifest.jsonl", out_rows)
    report = dict(n=len(res), si_sdr_db=round(float(np.mean([r["si_sdr"] for r in res])), 3),
                  mel_l1=round(float(np.mean([r["mel"] for r in res])), 4), sample_rate=sr,
                  kbps=None if args.unquantized else kbps)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

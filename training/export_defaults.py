#!/usr/bin/env python3
"""Copy trained runs into models/pretrained/ as float16, the form the binary embeds.

    /work/venv/ref/bin/python training/export_defaults.py --runs training/runs --out models/pretrained

Reads RUNS/{codec,musicgen,magnet,asr}/model (whichever exist) and writes:

| run | writes | format |
|---|---|---|
| codec | encodec-tiny/{config.json, model.safetensors} | Hugging Face EncodecModel |
| musicgen | musicgen-tiny/{config.json, generation_config.json, tokenizer.json, model.safetensors} | Hugging Face MusicgenForConditionalGeneration |
| magnet | magnet-tiny/{state_dict.bin, t5/{config.json, model.safetensors, tokenizer.json}} | audiocraft MAGNeT (`best_state` + `xp.cfg`) and the Hugging Face T5 encoder directory it was trained with (`magnet.py --t5-from` copies a MusicGen's) |
| asr | paraformer-tiny-en/{config.yaml, am.mvn, tokens.json, model.safetensors} | FunASR directory, with the state dict as safetensors (same keys as `model.pt`, the CTC head included for joint CTC decoding); `decoding.yaml` and the LM come from `asr_lm.py` |

The music models' codec (`--music-codec DIR`, default RUNS/codec/model: the codec whose tokens
musicgen.py and magnet.py were trained on) goes to magnet-tiny/codec/ and over musicgen-tiny's
embedded codec (`audio_encoder.*`), so both music models decode alike, whenever a music model is
exported or `--music-codec` is given. It need not be encodec-tiny: a codec trained further
changes its tokens, and the music LMs keep the codec they were trained on.
Floating-point tensors become float16 (halves the size; the loaders compute in float32).
MODEL_CARD.md files are written by hand from the evaluation (training/README.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def half(state: dict) -> dict:
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def export_hf(src: Path, dst: Path, files: list[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(src / f, dst / f)
    save_file(half(load_file(str(src / "model.safetensors"))), str(dst / "model.safetensors"), metadata={"format": "pt"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--music-codec", type=Path, default=None,
                    help="HF EnCodec dir the music LMs were trained on (default RUNS/codec/model)")
    args = ap.parse_args()
    done = []
    codec = args.runs / "codec" / "model"
    if codec.exists():
        export_hf(codec, args.out / "encodec-tiny", ["config.json"])
        done.append("encodec-tiny")
    mg = args.runs / "musicgen" / "model"
    if mg.exists():
        export_hf(mg, args.out / "musicgen-tiny", ["config.json", "generation_config.json", "tokenizer.json"])
        done.append("musicgen-tiny")
    mag = args.runs / "magnet" / "model"
    if mag.exists():
        pkg = torch.load(mag / "state_dict.bin", map_location="cpu", weights_only=False)
        pkg["best_state"] = half(pkg["best_state"])
        (args.out / "magnet-tiny").mkdir(parents=True, exist_ok=True)
        torch.save(pkg, args.out / "magnet-tiny" / "state_dict.bin")
        export_hf(mag / "t5", args.out / "magnet-tiny" / "t5", ["config.json", "tokenizer.json"])
        done.append("magnet-tiny")
    # given, or the codec run whenever a music model was exported
    music_exported = bool({"musicgen-tiny", "magnet-tiny"} & set(done))
    music_codec = args.music_codec or (codec if music_exported and codec.exists() else None)
    if music_codec is not None:
        if (args.out / "magnet-tiny").exists():
            export_hf(music_codec, args.out / "magnet-tiny" / "codec", ["config.json"])
        mg_file = args.out / "musicgen-tiny" / "model.safetensors"
        if mg_file.exists():
            # MusicGen's safetensors carries its codec (audio_encoder.*): keep it identical to
            # magnet-tiny's, so the hybrid schedule and rescoring mix tokens of one codec.
            state = load_file(str(mg_file))
            codec_state = half(load_file(str(music_codec / "model.safetensors")))
            missing = [k for k in codec_state if f"audio_encoder.{k}" not in state]
            assert not missing, f"musicgen-tiny's codec lacks {missing[:3]}"
            changed = sum(not torch.equal(state[f"audio_encoder.{k}"], v) for k, v in codec_state.items())
            state.update({f"audio_encoder.{k}": v for k, v in codec_state.items()})
            save_file(state, str(mg_file), metadata={"format": "pt"})
            print(f"musicgen-tiny: {changed} codec tensors changed to {music_codec}'s", flush=True)
    asr = args.runs / "asr" / "model"
    if asr.exists():
        dst = args.out / "paraformer-tiny-en"
        dst.mkdir(parents=True, exist_ok=True)
        for f in ["config.yaml", "am.mvn", "tokens.json"]:
            shutil.copy(asr / f, dst / f)
        state = torch.load(asr / "model.pt", map_location="cpu")  # with its CTC head (joint CTC decoding)
        save_file(half(state), str(dst / "model.safetensors"), metadata={"format": "pt"})
        done.append("paraformer-tiny-en")
    sizes = {n: sum(f.stat().st_size for f in (args.out / n).rglob("*") if f.is_file()) for n in done}
    print(json.dumps(dict(exported=done, bytes=sizes, total_mb=round(sum(sizes.values()) / 1e6, 2))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

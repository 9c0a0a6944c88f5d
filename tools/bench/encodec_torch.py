#!/usr/bin/env python3
"""Benchmark transformers' EncodecModel at the full facebook/encodec_24khz size.

EncodecConfig() defaults (24 kHz mono, num_filters 32, hidden 128, 32 codebooks
of 1024 -> 24 kbps, causal, weight norm, reflect padding) with seeded random
weights: the compute is the same as the real checkpoint's, no download needed.

    tools/.venv/bin/python tools/bench/encodec_torch.py --out /tmp/encodec-bench --threads 2

With ``--out DIR`` the model (config.json + model.safetensors, via
save_pretrained) and ``input.safetensors`` (key ``input``, float32 [1, 1, 240000],
10 s) are written there unless already present, and then loaded from there, so
that ``cadenza bench codec --model DIR --input DIR/input.safetensors`` times
exactly the same weights and signal. Times ``encode(bandwidth=24.0)`` and
``decode`` under ``torch.inference_mode()``: 1 warm-up run, then the best of
``--repeats``. Prints one JSON line on stdout:

    {"impl": "pytorch", "encode_s": ..., "decode_s": ..., "audio_s": 10.0, "threads": N}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import transformers  # noqa: E402
from transformers import EncodecConfig, EncodecModel  # noqa: E402

SEED = 1234
SAMPLING_RATE = 24000
AUDIO_S = 10.0
BANDWIDTH = 24.0


def make_input(seconds: float = AUDIO_S, sr: int = SAMPLING_RATE, seed: int = SEED) -> torch.Tensor:
    """Deterministic 10 s test signal, float32 [1, 1, T]: sines + noise, peak ~0.5."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    x = 0.2 * np.sin(2 * np.pi * 220.0 * t)
    x += 0.15 * np.sin(2 * np.pi * 554.37 * t + 1.0)
    x += 0.1 * np.sin(2 * np.pi * (1000.0 + 500.0 * np.sin(2 * np.pi * 0.25 * t)) * t)
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t)  # slow loudness changes
    x += 0.05 * rng.standard_normal(n)
    return torch.from_numpy(x.astype(np.float32)).reshape(1, 1, n)


@torch.no_grad()
def make_model(x: torch.Tensor) -> EncodecModel:
    """Full-size EnCodec 24 kHz, random weights; codebooks (zero after
    transformers' init) = random encoder-output frames + noise, so every
    quantizer sees non-degenerate residuals."""
    torch.manual_seed(SEED)
    model = EncodecModel(EncodecConfig()).eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    residual = model.encoder(x)[0].T  # [frames, 128]
    for layer in model.quantizer.layers:
        cb = layer.codebook
        std = residual.std(dim=0).clamp_min(1e-6)
        pick = torch.randperm(residual.shape[0], generator=gen)[torch.arange(cb.embed.shape[0]) % residual.shape[0]]
        embed = residual[pick] + 0.25 * std * torch.randn(cb.embed.shape, generator=gen)
        cb.embed.copy_(embed)
        cb.embed_avg.copy_(embed)
        cb.cluster_size.fill_(1.0)
        residual = residual - embed[cb.quantize(residual)]
    return model


def prepare(out: Path | None) -> tuple[EncodecModel, torch.Tensor]:
    if out is None:
        x = make_input()
        return make_model(x), x
    out.mkdir(parents=True, exist_ok=True)
    input_path = out / "input.safetensors"
    if not input_path.exists():
        save_file({"input": make_input().contiguous()}, str(input_path))
        print(f"wrote {input_path}", file=sys.stderr)
    x = load_file(str(input_path))["input"].to(torch.float32)
    if not ((out / "config.json").exists() and (out / "model.safetensors").exists()):
        make_model(x).save_pretrained(out, safe_serialization=True)
        print(f"wrote {out}/config.json, {out}/model.safetensors", file=sys.stderr)
    model = EncodecModel.from_pretrained(out, dtype=torch.float32).eval()
    return model, x


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="model/input directory (created and filled if needed)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after 1 warm-up (default: %(default)s)")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    model, x = prepare(args.out)
    audio_s = x.shape[-1] / model.config.sampling_rate

    with torch.inference_mode():
        enc = model.encode(x, bandwidth=BANDWIDTH)
        codes, scales = enc.audio_codes, enc.audio_scales
        print(f"codes {list(codes.shape)}, input {list(x.shape)}", file=sys.stderr)
        encode_s = best_time(lambda: model.encode(x, bandwidth=BANDWIDTH), args.repeats)
        decode_s = best_time(lambda: model.decode(codes, scales), args.repeats)

    print(
        json.dumps(
            {
                "impl": "pytorch",
                "encode_s": round(encode_s, 6),
                "decode_s": round(decode_s, 6),
                "audio_s": round(audio_s, 6),
                "threads": args.threads,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

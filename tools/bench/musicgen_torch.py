#!/usr/bin/env python3
"""Benchmark transformers' MusicgenForCausalLM decode steps at the musicgen-small size.

MusicgenDecoderConfig() defaults (hidden 1024, 24 layers, 16 heads, ffn 4096, 4 codebooks of
2048) with seeded random weights (normal, std 0.02; LayerNorms 1/0), so the compute and the
bytes read per step are those of facebook/musicgen-small without a download.

    /work/venv/ref/bin/python tools/bench/musicgen_torch.py --out /tmp/cadenza-bench-musicgen \
        --threads 2 --steps 50 --batch 1 8

With ``--out DIR`` the following are written unless already present (~1.7 GB: keep DIR under
/tmp, never in the repository):

- ``DIR/config.json``: the MusicgenDecoderConfig;
- ``DIR/model.safetensors``: the MusicgenForCausalLM state dict (``model.decoder.*``,
  ``lm_heads.*``);
- ``DIR/cond.safetensors``: ``encoder_hidden_states`` float32 [8, 16, 1024] (normal, std 1)
  and ``encoder_attention_mask`` int64 [8, 16] (ones); batch B uses the first B rows.

Decode loop per batch size B (greedy, under ``torch.inference_mode()``): step 0 is the prefill
of one BOS column (token 2048 in every codebook), every later step feeds back the argmax of the
last logits with the cache. ``--steps`` counts all steps; the steady-state rate is taken over
steps 1.. (the first step, which also computes the cross-attention K/V, is excluded). Best of
``--repeats`` (default 2) runs. One JSON line per batch on stdout:

    {"impl": "pytorch", "batch": B, "steps": S, "frames_per_s": ..., "step_ms": ...,
     "first_step_ms": ..., "threads": N}

One step produces one frame (one token in each of the 4 codebooks) per batch row;
``frames_per_s`` counts steps per second of one sequence, i.e. it does not multiply by B.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from transformers import MusicgenDecoderConfig, MusicgenForCausalLM  # noqa: E402

SEED = 1234
COND_ROWS = 8
COND_LEN = 16


def config() -> MusicgenDecoderConfig:
    # musicgen-small's decoder (the defaults, spelled out).
    return MusicgenDecoderConfig(
        vocab_size=2048,
        max_position_embeddings=2048,
        num_hidden_layers=24,
        ffn_dim=4096,
        num_attention_heads=16,
        hidden_size=1024,
        num_codebooks=4,
        audio_channels=1,
        activation_function="gelu",
        scale_embedding=False,
    )


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = SEED) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "layer_norm" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, model_path, cond_path = (out / "config.json", out / "model.safetensors", out / "cond.safetensors")
    if not (cfg_path.exists() and model_path.exists()):
        print(f"writing random-weight model to {out} ...", file=sys.stderr)
        cfg = config()
        torch.manual_seed(SEED)
        model = MusicgenForCausalLM(cfg).eval()
        randomize(model)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        tmp = model_path.with_suffix(".tmp")
        save_file(sd, str(tmp), metadata={"format": "pt"})
        tmp.rename(model_path)
        cfg.to_json_file(str(cfg_path))
        del model, sd
    if not cond_path.exists():
        gen = torch.Generator().manual_seed(SEED + 1)
        cond = {
            "encoder_hidden_states": torch.randn(COND_ROWS, COND_LEN, config().hidden_size, generator=gen),
            "encoder_attention_mask": torch.ones(COND_ROWS, COND_LEN, dtype=torch.int64),
        }
        save_file(cond, str(cond_path))


def load(out: Path) -> tuple[MusicgenForCausalLM, dict[str, torch.Tensor]]:
    cfg = MusicgenDecoderConfig.from_json_file(str(out / "config.json"))
    with torch.device("meta"):
        model = MusicgenForCausalLM(cfg)
    sd = load_file(str(out / "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    # Non-persistent buffers (sinusoidal positions) are rebuilt below; weights must all load.
    missing = [k for k in missing if "embed_positions" not in k]
    if missing or unexpected:
        sys.exit(f"musicgen_torch.py: state dict mismatch: missing {missing}, unexpected {unexpected}")
    # Rebuild buffers left on the meta device (the sinusoidal position table).
    pos = model.model.decoder.embed_positions
    if any(b.is_meta for b in pos.buffers()):
        real = type(pos)(cfg.max_position_embeddings, cfg.hidden_size)
        model.model.decoder.embed_positions = real
    model.eval()
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            sys.exit(f"musicgen_torch.py: {n} is still on the meta device")
    return model, load_file(str(out / "cond.safetensors"))


@torch.inference_mode()
def decode(model, cond, batch: int, steps: int) -> tuple[float, float, list[int]]:
    """Returns (first step s, steady-state s per step, last tokens of row 0)."""
    k = model.config.num_codebooks
    bos = model.config.bos_token_id
    enc = cond["encoder_hidden_states"][:batch].contiguous()
    enc_mask = cond["encoder_attention_mask"][:batch].contiguous()
    ids = torch.full((batch * k, 1), bos, dtype=torch.long)
    cache = None
    t0 = time.perf_counter()
    t1 = t0
    for s in range(steps):
        out = model(
            input_ids=ids,
            encoder_hidden_states=enc,
            encoder_attention_mask=enc_mask,
            cache=cache,
            use_cache=True,
        )
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        ids = out.logits[:, -1, :].argmax(-1).reshape(batch * k, 1)
        if s == 0:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / max(steps - 1, 1), ids[:k, 0].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="model directory (created if missing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.steps < 2:
        sys.exit("--steps must be at least 2")
    if max(args.batch) > COND_ROWS:
        sys.exit(f"--batch at most {COND_ROWS}")
    torch.set_num_threads(args.threads)
    prepare(args.out)
    model, cond = load(args.out)
    # Warm-up (allocator, oneDNN kernels).
    decode(model, cond, 1, 3)
    for b in args.batch:
        best = None
        for _ in range(args.repeats):
            first, step, toks = decode(model, cond, b, args.steps)
            if best is None or step < best[1]:
                best = (first, step, toks)
        first, step, toks = best
        print(
            json.dumps(
                {
                    "impl": "pytorch",
                    "batch": b,
                    "steps": args.steps,
                    "frames_per_s": round(1.0 / step, 3),
                    "step_ms": round(step * 1e3, 3),
                    "first_step_ms": round(first * 1e3, 3),
                    "threads": torch.get_num_threads(),
                    "last_tokens_row0": toks,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

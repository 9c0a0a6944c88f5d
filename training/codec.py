#!/usr/bin/env python3
"""Train a small EnCodec (transformers `EncodecModel`, HF directory) on music + speech.

    nice -n 19 /work/venv/ref/bin/python training/codec.py --data training/datasets --out training/runs/codec [--resume]

32 kHz mono, strides [8,5,4,4] (hop 640 -> 50 frames/s), 4 residual codebooks of 256 entries
(1.6 kbps; `--codebooks 8` adds 3.2 kbps, trained by quantizer dropout): the layout of MusicGen's
EnCodec, so the music LMs (musicgen.py, magnet.py) use it as their tokenizer. Loss: waveform L1
+ multi-scale log-mel L1 + commitment; the RVQ codebooks are EMA-updated with dead-code restarts
(as in EnCodec; no GAN). Speech (16 kHz) is resampled to 32 kHz. Writes
OUT/model/{config.json,model.safetensors} (RVQ training buffers dropped, as in
tools/fixtures/make_untrained_default.py).
"""

from __future__ import annotations

import json
import math
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Trainer, base_args, read_manifest, seed_all  # noqa: E402

SR = 32000


def codec_config(filters: int, codebook_size: int = 256, codebooks: int = 4):
    """`codebooks` in groups of 4, one bandwidth per group (4: 1.6 kbps; 8: 1.6 and 3.2 kbps)."""
    from transformers import EncodecConfig

    assert codebooks % 4 == 0 and codebooks > 0, f"codebooks {codebooks}: a multiple of 4"
    kbps = 4 * 50 * math.log2(codebook_size) / 1000

    return EncodecConfig(
        sampling_rate=SR, audio_channels=1, num_filters=filters, hidden_size=64, codebook_dim=64,
        upsampling_ratios=[8, 5, 4, 4], num_lstm_layers=1, num_residual_layers=1,
        codebook_size=codebook_size, target_bandwidths=[round(g * kbps, 3) for g in range(1, codebooks // 4 + 1)],
        use_causal_conv=False, use_conv_shortcut=False, pad_mode="reflect",
        norm_type="weight_norm", normalize=False, chunk_length_s=None, overlap=None)


class Crops:
    """Random `seconds`-long crops of the train clips: speech and music alternately, or speech with
    probability `speech_frac`."""

    def __init__(self, data: Path, seconds: float, seed: int, speech_frac: float | None = None):
        self.groups = []
        self.speech_frac = speech_frac
        for sub in ("music", "speech"):
            m = data / sub / "manifest.jsonl"
            if m.exists():
                self.groups.append([r for r in read_manifest(m) if r["split"] == "train"])
        assert self.groups, f"no music/ or speech/ manifest under {data}"
        assert speech_frac is None or len(self.groups) == 2, "--speech-frac needs music/ and speech/"
        self.n = int(seconds * SR)
        self.rng = random.Random(seed)

    def batch(self, b: int) -> torch.Tensor:
        out = np.zeros((b, 1, self.n), np.float32)
        for i in range(b):
            if self.speech_frac is None:
                g = self.groups[i % len(self.groups)]
            else:
                g = self.groups[1 if self.rng.random() < self.speech_frac else 0]
            r = self.rng.choice(g)
            info = sf.info(r["path"])
            src_n = int(self.n * info.samplerate / SR) + 1
            start = self.rng.randint(0, max(0, info.frames - src_n))
            x, sr = sf.read(r["path"], start=start, frames=src_n, dtype="float32", always_2d=True)
            x = x.mean(1)
            if sr != SR:
                from scipy.signal import resample_poly
                x = resample_poly(x, SR, sr).astype(np.float32)
            x = x[: self.n] * self.rng.uniform(0.5, 1.0) / (np.abs(x).max() + 1e-5)
            out[i, 0, : len(x)] = x
        return torch.from_numpy(out)


class StftLoss(torch.nn.Module):
    """Multi-resolution STFT loss (Parallel WaveGAN, Yamamoto et al. 2020): spectral convergence
    plus log-magnitude L1 over three linear-frequency resolutions; complements the mel loss
    above 4 kHz, where the mel filters are wide."""

    def __init__(self, ffts=((512, 128), (1024, 256), (2048, 512))):
        super().__init__()
        self.ffts = ffts
        for n, _ in ffts:
            self.register_buffer(f"win{n}", torch.hann_window(n), persistent=False)

    def forward(self, y, x):
        loss = 0.0
        for n, hop in self.ffts:
            w = getattr(self, f"win{n}")
            a = torch.stft(y, n, hop, window=w, return_complex=True).abs().clamp_min(1e-7)
            b = torch.stft(x, n, hop, window=w, return_complex=True).abs().clamp_min(1e-7)
            loss = loss + torch.linalg.norm(b - a) / torch.linalg.norm(b).clamp_min(1e-7)
            loss = loss + F.l1_loss(torch.log(a), torch.log(b))
        return loss / len(self.ffts)


class MelLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        import torchaudio

        self.mels = torch.nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(SR, n_fft=n, hop_length=n // 4, n_mels=m, power=1.0)
            for n, m in [(256, 32), (512, 64), (1024, 64), (2048, 80)])

    def forward(self, y, x):
        loss = 0.0
        for mel in self.mels:
            a, b = mel(y), mel(x)
            loss = loss + F.l1_loss(torch.log(a + 1e-5), torch.log(b + 1e-5)) + F.l1_loss(a, b)
        return loss / len(self.mels)


def quantize(model, e: torch.Tensor, train: bool, decay: float = 0.99, n_q: int | None = None):
    """RVQ with straight-through gradient and EMA codebooks, over the first `n_q` codebooks
    (all by default). e: [B, D, T]."""
    residual = e.detach()
    q_sum = torch.zeros_like(e)
    commit = 0.0
    codes = []
    for layer in model.quantizer.layers[:n_q]:
        cb = layer.codebook
        r = residual.permute(0, 2, 1).reshape(-1, e.shape[1])
        if train and not bool(cb.inited.item()):
            cb.embed.copy_(r[torch.randint(len(r), (cb.embed.shape[0],))])
            cb.embed_avg.copy_(cb.embed)
            cb.cluster_size.fill_(1.0)
            cb.inited.fill_(1.0)
        idx = torch.cdist(r, cb.embed).argmin(-1)
        q = cb.embed[idx]
        if train:
            onehot = F.one_hot(idx, cb.embed.shape[0]).to(r.dtype)
            cb.cluster_size.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
            cb.embed_avg.mul_(decay).add_(onehot.t() @ r, alpha=1 - decay)
            n = cb.cluster_size.sum()
            size = (cb.cluster_size + 1e-5) / (n + cb.embed.shape[0] * 1e-5) * n
            cb.embed.copy_(cb.embed_avg / size[:, None])
            dead = cb.cluster_size < 0.05  # restart unused codes on random current frames
            if dead.any():
                new = r[torch.randint(len(r), (int(dead.sum()),))]
                cb.embed[dead] = new
                cb.embed_avg[dead] = new
                cb.cluster_size[dead] = 1.0
        qt = q.view(e.shape[0], e.shape[2], e.shape[1]).permute(0, 2, 1)
        commit = commit + F.mse_loss(residual, qt)
        q_sum = q_sum + qt
        residual = residual - qt
        codes.append(idx.view(e.shape[0], e.shape[2]))
    out = e + (q_sum - e).detach()
    commit_e = F.mse_loss(e, q_sum.detach())
    return out, commit_e, torch.stack(codes, 1)


def init_from(src: Path, filters: int, codebook_size: int, codebooks: int = 4):
    """A codec to train from a trained one (an exported HF directory: no RVQ training buffers).

    Every weight is copied; each codebook keeps its entries and its EMA state starts as if every
    entry had been used once (embed_avg = embed, cluster_size = 1), so the first steps move them
    gently instead of re-initialising them from data. With a larger `codebook_size` the extra
    entries start dead (cluster_size 0): the first step's dead-code restart puts them on current
    residuals, so the codebook grows from where the trained one was."""
    from transformers import EncodecModel

    old = EncodecModel.from_pretrained(src).float()
    model = EncodecModel(codec_config(filters, codebook_size, codebooks))
    new_state = model.state_dict()
    if old.config.num_quantizers > model.config.num_quantizers:  # e.g. codebooks added by codec_rvq_extend.py: fitted to this encoder, refit after
        print(f"{src}: keeping the first {model.config.num_quantizers} of {old.config.num_quantizers} "
              "codebooks (refit the rest with codec_rvq_extend.py after training)", flush=True)
    for k, v in old.state_dict().items():
        if k.startswith("quantizer.layers.") and k not in new_state:  # a codebook past this model's
            continue
        if k.endswith(".codebook.embed"):
            n = v.shape[0]
            assert n <= codebook_size, f"{src}: {n} entries > --codebook-size {codebook_size}"
            new_state[k][:n] = v
            new_state[k.replace(".embed", ".embed_avg")][:n] = v
            new_state[k.replace(".embed", ".cluster_size")][:] = 0.0
            new_state[k.replace(".embed", ".cluster_size")][:n] = 1.0
            new_state[k.replace(".embed", ".inited")].fill_(1.0)
        elif k.endswith((".embed_avg", ".cluster_size", ".inited")):
            continue
        else:
            assert new_state[k].shape == v.shape, f"{k}: {tuple(v.shape)} vs {tuple(new_state[k].shape)} (--filters?)"
            new_state[k] = v
    model.load_state_dict(new_state)
    return model.train()


def export(model, out: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        src = Path(tmp) / "model.safetensors"
        with safe_open(str(src), "pt") as f:
            meta = {"format": (f.metadata() or {}).get("format", "pt")}
        state = {k: v for k, v in load_file(str(src)).items()
                 if not k.endswith((".codebook.embed_avg", ".codebook.cluster_size", ".codebook.inited"))}
        save_file(state, str(out / "model.safetensors"), metadata=meta)
        (out / "config.json").write_bytes((Path(tmp) / "config.json").read_bytes())


def main() -> int:
    p = base_args(__doc__, steps=2500, batch=8, ckpt_every=200)
    p.add_argument("--seconds", type=float, default=1.0, help="crop length")
    p.add_argument("--filters", type=int, default=12, help="SEANet base channels (EnCodec: 32)")
    # The music LMs are trained on this codec's tokens, so retraining the whole codec would
    # invalidate them. Fine-tuning only the decoder keeps every token (encoder and codebooks are
    # frozen) and spends all the compute on how tokens sound.
    p.add_argument("--finetune-decoder", type=Path, default=None,
                   help="HF EncodecModel directory: keep its encoder and codebooks fixed, train the decoder")
    p.add_argument("--init-from", type=Path, default=None,
                   help="HF EncodecModel directory (e.g. models/pretrained/encodec-tiny): start from its weights")
    p.add_argument("--codebook-size", type=int, default=256,
                   help="entries per codebook (MusicGen's EnCodec: 2048); with --init-from, may grow the source's")
    # EnCodec trains one model for several bandwidths by quantizer dropout: each batch is
    # quantized with the codebooks of one target bandwidth, drawn uniformly (Défossez et al. 2022,
    # section 3.2; audiocraft's ResidualVectorQuantizer `q_dropout`).
    p.add_argument("--codebooks", type=int, default=4,
                   help="residual codebooks, a multiple of 4 (8: 1.6 and 3.2 kbps, trained by quantizer dropout)")
    p.add_argument("--speech-frac", type=float, default=None,
                   help="share of speech crops (default: speech and music alternately)")
    p.add_argument("--stft-weight", type=float, default=0.0, help="weight of the multi-resolution STFT loss")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.batch, args.ckpt_every, args.filters = min(args.steps, 30), 4, 10, 8
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    from transformers import EncodecModel

    frozen = args.finetune_decoder is not None  # encoder and codebooks fixed: the tokens never change
    if frozen:
        model = EncodecModel.from_pretrained(args.finetune_decoder).float().train()
        for q in list(model.encoder.parameters()) + list(model.quantizer.parameters()):
            q.requires_grad_(False)
        params = list(model.decoder.parameters())
    else:  # on --resume the Trainer loads the checkpoint over either start
        model = (init_from(args.init_from, args.filters, args.codebook_size, args.codebooks)
                 if args.init_from is not None
                 else EncodecModel(codec_config(args.filters, args.codebook_size, args.codebooks)).train())
        params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.8, 0.99), weight_decay=0.0)
    tr = Trainer(args, model, opt)
    data = Crops(args.data, args.seconds, args.seed + tr.step, args.speech_frac)
    n_qs = [4 * g for g in range(1, model.config.num_quantizers // 4 + 1)]
    mel = MelLoss()
    stft = StftLoss()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"codec: {n_params:,} parameters", flush=True)
    while not tr.done():
        tr.lr_step()
        x = data.batch(args.batch)
        # quantizer dropout, on torch's RNG (checkpointed); one bandwidth draws nothing
        n_q = n_qs[int(torch.randint(len(n_qs), ()))] if len(n_qs) > 1 else n_qs[0]
        if frozen:
            with torch.no_grad():
                q, commit, _ = quantize(model, model.encoder(x), train=False, n_q=n_q)
        else:
            q, commit, _ = quantize(model, model.encoder(x), train=True, n_q=n_q)
        y = model.decoder(q)[..., : x.shape[-1]]
        l1 = F.l1_loss(y, x)
        lm = mel(y[:, 0], x[:, 0])
        ls = stft(y[:, 0], x[:, 0]) if args.stft_weight > 0 else torch.zeros(())
        loss = l1 + lm + args.stft_weight * ls + (0.0 if frozen else 0.25 * commit)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tr.end_step(dict(loss=loss.item(), n_q=n_q, l1=l1.item(), mel=lm.item(), stft=ls.item(), commit=float(commit)),
                    samples=args.batch * args.seconds)
    model.eval()
    export(model, args.out / "model")
    # reload with the reference class and reconstruct one clip
    re = EncodecModel.from_pretrained(args.out / "model").eval()
    x = data.batch(1)
    with torch.no_grad():
        codes = re.encode(x).audio_codes
        y = re.decode(codes, [None]).audio_values[..., : x.shape[-1]]
    sdr = 10 * torch.log10((x ** 2).sum() / ((x - y) ** 2).sum()).item()
    summary = dict(tr.summary(), parameters=n_params, codes=list(codes.shape), reload_snr_db=round(sdr, 2),
                   audio_s_per_s=round(tr.summary()["steps_per_s"] * args.batch * args.seconds, 3))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

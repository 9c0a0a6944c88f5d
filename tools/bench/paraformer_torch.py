"""Paraformer-large-sized random model: build it with FunASR's classes, time PyTorch inference.

    paraformer_torch.py build DIR SECONDS   writes DIR/{model.pt,config.yaml,am.mvn,tokens.json,input.wav}
    paraformer_torch.py time DIR THREADS REPEATS   prints one JSON line {"impl": "funasr", ...}
    paraformer_torch.py time-streaming DIR THREADS REPEATS   FunASR's chunked inference of
        DIR/streaming, one JSON line {"impl": "funasr-streaming", ...}
    paraformer_torch.py streaming DIR   writes DIR/streaming/: the same weights as a FunASR
        ParaformerStreaming directory (SANMEncoderChunkOpt, input_layer pe_online; the state dict
        keys are those of Paraformer), for Cadenza's chunked streaming measurements

The configuration is FunASR's paraformer-large (iic/speech_paraformer-large_asr_nat-zh-cn-16k-
common-vocab8404): SAN-M encoder 50 blocks of 512 (4 heads, FFN 2048, kernel 11), SAN-M decoder
16 blocks (FFN 2048), CifPredictorV2, 80 mels, LFR 7/6, 8404 tokens. Weights are random (scaled
as tools/fixtures/paraformer.py does so CIF fires every few frames). Run with /work/venv/ref.
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
import yaml


def test_wave(seconds, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = int(16000 * seconds)
    t = torch.arange(n, dtype=torch.float64) / 16000
    w = 0.2 * torch.sin(2 * math.pi * 220 * t) + 0.1 * torch.sin(2 * math.pi * 1375 * t + 0.3)
    w = w * (0.5 + 0.5 * torch.sin(2 * math.pi * 1.7 * t))
    w = w + 0.02 * torch.randn(n, generator=g, dtype=torch.float64)
    return w.to(torch.float32)


ENC = dict(output_size=512, attention_heads=4, linear_units=2048, num_blocks=50,
           dropout_rate=0.0, positional_dropout_rate=0.0, attention_dropout_rate=0.0,
           input_layer="pe", pos_enc_class="SinusoidalPositionEncoder", normalize_before=True,
           kernel_size=11, sanm_shfit=0, selfattention_layer_type="sanm")
DEC = dict(attention_heads=4, linear_units=2048, num_blocks=16, dropout_rate=0.0,
           positional_dropout_rate=0.0, self_attention_dropout_rate=0.0,
           src_attention_dropout_rate=0.0, att_layer_num=16, kernel_size=11, sanm_shfit=0)
PRED = dict(idim=512, threshold=1.0, l_order=1, r_order=1, tail_threshold=0.45)
FRONT = dict(fs=16000, window="hamming", n_mels=80, frame_length=25, frame_shift=10,
             lfr_m=7, lfr_n=6, dither=0.0)
VOCAB = 8404


def build(out, seconds):
    from funasr.frontends.wav_frontend import WavFrontend
    from funasr.models.paraformer.model import Paraformer
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fixtures"))
    from paraformer import write_mvn

    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    input_size = 560
    shift = (-(8.0 + torch.rand(input_size) * 4)).tolist()
    scale = (0.2 + torch.rand(input_size) * 0.2).tolist()
    write_mvn(os.path.join(out, "am.mvn"), shift, scale)
    tokens = ["<blank>", "<s>", "</s>"] + [chr(0x4E00 + i) for i in range(VOCAB - 4)] + ["<unk>"]
    model = Paraformer(encoder="SANMEncoder", encoder_conf=ENC, decoder="ParaformerSANMDecoder",
                       decoder_conf=DEC, predictor="CifPredictorV2", predictor_conf=PRED,
                       input_size=input_size, vocab_size=VOCAB, ctc_weight=0.0,
                       predictor_bias=1, sampling_ratio=0.75)
    model.eval()
    wave = test_wave(seconds)
    frontend = WavFrontend(cmvn_file=os.path.join(out, "am.mvn"), **FRONT)
    with torch.no_grad():
        feats, feats_len = frontend(wave[None], torch.tensor([wave.shape[0]]))
        enc_out, _ = model.encode(feats, feats_len)
        p = model.predictor
        hid = torch.relu(p.cif_conv1d(p.pad(enc_out.transpose(1, 2)))).transpose(1, 2)
        logit = p.cif_output(hid)[0, :, 0]
        s = 1.5 / logit.std()
        b = p.cif_output.bias.clone()
        p.cif_output.weight.mul_(s)
        p.cif_output.bias.copy_(-0.6 - s * (logit.mean() - b))
    torch.save(model.state_dict(), os.path.join(out, "model.pt"))
    config = dict(model="Paraformer",
                  model_conf=dict(ctc_weight=0.0, predictor_bias=1, sampling_ratio=0.75),
                  encoder="SANMEncoder", encoder_conf=ENC, decoder="ParaformerSANMDecoder",
                  decoder_conf=DEC, predictor="CifPredictorV2", predictor_conf=PRED,
                  frontend="WavFrontend", frontend_conf=FRONT, tokenizer="CharTokenizer",
                  tokenizer_conf=dict(unk_symbol="<unk>", split_with_space=True),
                  input_size=input_size, normalize=None)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False, allow_unicode=True)
    with open(os.path.join(out, "tokens.json"), "w") as f:
        json.dump(tokens, f, ensure_ascii=False)
    # 16-bit WAV of the input (both implementations read this file).
    import wave as wavmod
    pcm = (wave.clamp(-1, 1) * 32767).round().to(torch.int16).numpy().tobytes()
    with wavmod.open(os.path.join(out, "input.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    n = sum(v.numel() for v in model.state_dict().values())
    print(json.dumps({"built": out, "parameters": n, "seconds": seconds}))


def timed(out, threads, repeats):
    from funasr.frontends.wav_frontend import WavFrontend
    from funasr.models.paraformer.model import Paraformer
    from funasr.tokenizer.char_tokenizer import CharTokenizer
    import wave as wavmod

    torch.set_num_threads(threads)
    with wavmod.open(os.path.join(out, "input.wav"), "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    wave = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
    tokens = json.load(open(os.path.join(out, "tokens.json")))
    model = Paraformer(encoder="SANMEncoder", encoder_conf=ENC, decoder="ParaformerSANMDecoder",
                       decoder_conf=DEC, predictor="CifPredictorV2", predictor_conf=PRED,
                       input_size=560, vocab_size=VOCAB, ctc_weight=0.0,
                       predictor_bias=1, sampling_ratio=0.75)
    model.load_state_dict(torch.load(os.path.join(out, "model.pt"), map_location="cpu"))
    model.eval()
    frontend = WavFrontend(cmvn_file=os.path.join(out, "am.mvn"), **FRONT)
    tok = CharTokenizer(token_list=tokens, unk_symbol="<unk>", split_with_space=True)
    audio_s = wave.shape[0] / 16000
    best = float("inf")
    text = ""
    with torch.no_grad():
        model.inference([wave], key=["w"], tokenizer=tok, frontend=frontend, device="cpu")
        for _ in range(repeats):
            t = time.perf_counter()
            res, _ = model.inference([wave], key=["w"], tokenizer=tok, frontend=frontend,
                                     device="cpu")
            best = min(best, time.perf_counter() - t)
            text = res[0]["text"]
    print(json.dumps({"impl": "funasr", "offline_s": best, "audio_s": audio_s,
                      "rtf": best / audio_s, "threads": threads,
                      "tokens": len(text.split())}))


def timed_streaming(out, threads, repeats):
    """FunASR's own chunked inference of the streaming directory: `ParaformerStreaming.inference`
    fed 600 ms pieces with its cache (chunk_size [0, 10, 5], look-back 4/1, WavFrontendOnline),
    the last one with is_final=True, as FunASR's streaming demo does."""
    from funasr.frontends.wav_frontend import WavFrontendOnline
    from funasr.models.paraformer_streaming.model import ParaformerStreaming
    from funasr.tokenizer.char_tokenizer import CharTokenizer
    import wave as wavmod

    torch.set_num_threads(threads)
    d = os.path.join(out, "streaming")
    with open(os.path.join(d, "config.yaml")) as f:
        config = yaml.safe_load(f)
    with wavmod.open(os.path.join(out, "input.wav"), "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    wave = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
    tokens = json.load(open(os.path.join(d, "tokens.json")))
    enc = config["encoder_conf"]
    model = ParaformerStreaming(encoder="SANMEncoderChunkOpt", encoder_conf=enc,
                                decoder="ParaformerSANMDecoder", decoder_conf=DEC,
                                predictor="CifPredictorV2", predictor_conf=PRED, input_size=560,
                                vocab_size=VOCAB, ctc_weight=0.0, predictor_bias=1,
                                sampling_ratio=0.75)
    model.load_state_dict(torch.load(os.path.join(out, "model.pt"), map_location="cpu"))
    model.eval()
    tok = CharTokenizer(token_list=tokens, unk_symbol="<unk>", split_with_space=True)
    audio_s = wave.shape[0] / 16000
    step = 9600
    kw = dict(chunk_size=[0, 10, 5], encoder_chunk_look_back=4, decoder_chunk_look_back=1,
              encoder_conf=enc, frontend_conf=FRONT, device="cpu")

    def once():
        frontend = WavFrontendOnline(cmvn_file=os.path.join(d, "am.mvn"), **FRONT)
        cache = {}
        lat = []
        pieces = [wave[i : i + step] for i in range(0, wave.shape[0], step)]
        for i, p in enumerate(pieces):
            t = time.perf_counter()
            model.inference([p], key=["w"], tokenizer=tok, frontend=frontend, cache=cache,
                            is_final=i == len(pieces) - 1, **kw)
            lat.append(time.perf_counter() - t)
        return sum(lat), sorted(lat)

    best, lat = float("inf"), []
    with torch.no_grad():
        once()
        for _ in range(repeats):
            total, l = once()
            if total < best:
                best, lat = total, l
    print(json.dumps({"impl": "funasr-streaming", "stream_s": best, "audio_s": audio_s,
                      "stream_rtf": best / audio_s, "threads": threads,
                      "chunk_p50_s": lat[len(lat) // 2],
                      "chunk_p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]}))


def streaming(out):
    import shutil

    dst = os.path.join(out, "streaming")
    os.makedirs(dst, exist_ok=True)
    for f in ("am.mvn", "tokens.json"):
        shutil.copy(os.path.join(out, f), os.path.join(dst, f))
    link = os.path.join(dst, "model.pt")
    if not os.path.exists(link):
        os.symlink(os.path.abspath(os.path.join(out, "model.pt")), link)
    with open(os.path.join(out, "config.yaml")) as f:
        config = yaml.safe_load(f)
    config["model"] = "ParaformerStreaming"
    config["encoder"] = "SANMEncoderChunkOpt"
    # paraformer-zh-streaming's encoder options (chunking used in training; inference takes
    # chunk_size [0, 10, 5] from the caller).
    config["encoder_conf"] = dict(
        {k: v for k, v in ENC.items() if k != "pos_enc_class"}, input_layer="pe_online",
        chunk_size=[12, 15], stride=[8, 10], pad_left=[0, 0],
        encoder_att_look_back_factor=[4, 4], decoder_att_look_back_factor=[1, 1],
    )
    config["frontend"] = "WavFrontendOnline"
    with open(os.path.join(dst, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False, allow_unicode=True)
    print(json.dumps({"built": dst}))


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2], float(sys.argv[3]))
    elif sys.argv[1] == "streaming":
        streaming(sys.argv[2])
    elif sys.argv[1] == "time-streaming":
        timed_streaming(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        timed(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

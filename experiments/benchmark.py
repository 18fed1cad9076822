"""Speed, size and compute of FastCap models, side by side with a Hugging Face captioner.

    python experiments/benchmark.py                       # tiny/small/base, int8, mixed 4/8, HF twins
    python experiments/benchmark.py --quick               # tiny only, 2 repeats (what the tests run)
    python experiments/benchmark.py --device cuda --out experiments/results/benchmark_cuda.md

Everything is measured in one run on one machine: medians of repeated runs after warm-up,
the FastCap and Hugging Face timings of a size interleaved run by run so that load from other
processes hits both alike. Models are randomly initialised (speed does not depend on training)
with a COCO-sized vocabulary, and every caption is decoded to full length (19 steps after BOS)
so that both libraries do the same work. The Hugging Face rows need `pip install transformers`
(extra `bench`); without it they are skipped with a note.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Spinning OpenMP workers stall each other when another process holds a core (a shared machine):
# 2-thread decoding measured 9x slower that way. Must be set before torch loads libgomp;
# OMP_WAIT_POLICY=ACTIVE in the environment restores the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

from fastcap.data.vocab import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from fastcap.device import resolve_device  # noqa: E402
from fastcap.model.captioner import FastCap, ModelConfig  # noqa: E402
from fastcap.train.objectives import CrossEntropy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONF = ROOT / "conf" / "model"
VOCAB = 10_000     # about COCO's (Karpathy split, words seen >= 5 times: 9,487)
MAX_LEN = 20       # BOS + 19 generated tokens
STEPS = MAX_LEN - 1
CAPTIONS_PER_IMAGE = 5
BEAM = 3

COLUMNS = ["model", "params (M)", "GFLOPs/caption", "checkpoint MB", "greedy b1 ms/img", "beam3 b1 ms/img",
           "greedy b{B} img/s", "train b{B} img/s", "% of matmul peak (b{B})"]


@dataclass
class Settings:
    sizes: list[str]
    quant_sizes: list[str]
    hf_sizes: list[str]
    batch: int
    repeats_b1: int
    repeats_batch: int
    warmup: int
    peak_repeats: int
    device: torch.device
    threads: int


@dataclass
class Row:
    name: str
    params: float | None = None
    gflops: float | None = None
    ckpt_mb: float | None = None
    greedy_ms: float | None = None
    beam_ms: float | None = None
    batch_ips: float | None = None
    train_ips: float | None = None
    encode_ms: float | None = None
    step_mb: float | None = None     # weights a batch-1 decoding step must read
    note: str = ""
    extra: dict = field(default_factory=dict)


# --- timing -----------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                device: torch.device) -> dict[str, float]:
    """Median seconds per call of each fn; the fns take turns so that background load is shared fairly."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times[k].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak(device: torch.device, repeats: int, n: int = 2048) -> float:
    """Measured fp32 GEMM rate (GFLOP/s): the ceiling any model's arithmetic can reach here."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sec = interleaved({"mm": lambda: torch.mm(a, b)}, repeats, 1, device)["mm"]
    return 2 * n ** 3 / sec / 1e9


def stream_bandwidth(device: torch.device, repeats: int, total_mb: int = 64) -> float:
    """GB/s of batch-1 GEMVs over more fp32 weights than the caches hold: the batch-1 decoding floor."""
    n = 1024
    ws = [torch.randn(n, n, device=device) for _ in range(max(1, total_mb * 2 ** 20 // (4 * n * n)))]
    b, x = torch.randn(n, device=device), torch.randn(1, n, device=device)
    sec = interleaved({"gemv": lambda: [torch.addmm(b, x, w) for w in ws]}, repeats, 1, device)["gemv"]
    return sum(w.numel() * 4 for w in ws) / sec / 1e9


def decoder_step_mb(model: FastCap) -> float:
    """MB of parameters one decoding step reads: decoder blocks, final norm, output head."""
    mods = list(model.blocks) + [model.ln_f, model.head]
    return sum(p.numel() * p.element_size() for m in mods for p in m.parameters()) / 1e6


def count_gflops(fn: Callable[[], object]) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The math backend decomposes attention into matmuls the counter sees on every device.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def saved_mb(obj: object) -> float:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell() / 2 ** 20


# --- models -------------------------------------------------------------------------
def fastcap_config(size: str) -> ModelConfig:
    d = OmegaConf.to_container(OmegaConf.load(MODEL_CONF / f"fastcap_{size}.yaml"))
    return ModelConfig.from_dict({**d, "vocab_size": VOCAB, "max_len": MAX_LEN})


def build_fastcap(size: str, device: torch.device) -> FastCap:
    torch.manual_seed(0)
    model = FastCap(fastcap_config(size))
    with torch.no_grad():
        # A random model may emit EOS at any step; forbidding it makes every caption full length,
        # the same work as Hugging Face's min_new_tokens.
        model.head.bias[EOS_ID] = -1e4
    return model.to(device).eval()


def mixed_allocation(model: nn.Module) -> tuple[dict[str, int], float]:
    """4 bits for MLP fc/out, 8 elsewhere; then the largest 8-bit layers go to 4 until avg <= 5 bits."""
    from fastcap.quant import layer_params, quantizable_layers

    layers = quantizable_layers(model)
    params = layer_params(model, layers)
    alloc = {n: 4 if n.endswith(("mlp.fc", "mlp.out")) else 8 for n in layers}

    def avg() -> float:
        return sum(params[n] * alloc[n] for n in layers) / sum(params.values())

    for n in sorted(layers, key=lambda n: -params[n]):
        if avg() <= 5:
            break
        alloc[n] = 4
    return alloc, avg()


def quantized(model: FastCap, kind: str) -> tuple[nn.Module, float, str]:
    """(converted copy, checkpoint MB of its quantized payload, allocation summary)."""
    from fastcap.quant import convert, quantizable_layers, quantized_state

    if kind == "int8":
        alloc, avg = {n: 8 for n in quantizable_layers(model)}, 8.0
        summary = "all layers 8-bit"
    else:
        alloc, avg = mixed_allocation(model)
        four = sorted(n for n, b in alloc.items() if b == 4)
        summary = f"avg {avg:.2f} bits; 4-bit: {', '.join(shorten(four))}; 8-bit: the rest"
    q = convert(copy.deepcopy(model), alloc)
    return q.eval(), saved_mb(quantized_state(q)), summary


def shorten(names: list[str]) -> list[str]:
    """'blocks.0.mlp.fc', 'blocks.1.mlp.fc' -> 'blocks.*.mlp.fc' (the table note stays one line)."""
    import re

    out: list[str] = []
    for n in names:
        s = re.sub(r"\.\d+\.", ".*.", n)
        if s not in out:
            out.append(s)
    return out


def build_hf(size: str, device: torch.device):
    """ViT encoder + GPT-2 decoder (with cross-attention) shaped like FastCap `size`; no download."""
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    c = fastcap_config(size)
    e = c.encoder
    enc = ViTConfig(image_size=e.image_size, patch_size=e.patch_size, hidden_size=e.width,
                    num_hidden_layers=e.depth, num_attention_heads=e.heads, intermediate_size=4 * e.width)
    # Untied output head: FastCap's head is its own matrix, and parameter counts should match.
    dec = GPT2Config(vocab_size=VOCAB, n_positions=MAX_LEN, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads,
                     n_inner=c.mlp_mult * c.d_model, add_cross_attention=True, is_decoder=True,
                     bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = BOS_ID, PAD_ID, EOS_ID
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config=cfg)
    gc = model.generation_config
    gc.decoder_start_token_id, gc.bos_token_id, gc.pad_token_id, gc.eos_token_id = BOS_ID, BOS_ID, PAD_ID, EOS_ID
    return model.to(device).eval()


def hf_available() -> str | None:
    """None when transformers can be used, else why not."""
    try:
        import transformers  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"transformers is not installed ({type(e).__name__}); `pip install transformers` (extra `bench`)"
    return None


# --- workloads ----------------------------------------------------------------------
def caption_batch(n_images: int, image_size: int, device: torch.device, seed: int = 0) -> dict:
    """Images and 5 full-length captions each (BOS w1..w18 EOS), as the training loader gives them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB, (n_images, CAPTIONS_PER_IMAGE, MAX_LEN), generator=g)
    tokens[..., 0], tokens[..., -1] = BOS_ID, EOS_ID
    return {"image": torch.randn(n_images, 3, image_size, image_size, generator=g).to(device),
            "tokens": tokens.to(device)}


def fastcap_train_step(model: FastCap, batch: dict) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    objective = CrossEntropy()

    def step() -> None:
        loss, _ = objective(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def hf_train_step(model, batch: dict) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, k, t = batch["tokens"].shape
    tokens = batch["tokens"].reshape(b * k, t)

    def step() -> None:
        # Each image encoded once and shared by its 5 captions, as FastCap does: equal work.
        enc = model.encoder(pixel_values=batch["image"]).last_hidden_state.repeat_interleave(k, dim=0)
        logits = model(encoder_outputs=(enc,), decoder_input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), ignore_index=PAD_ID)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def hf_generate(model, images: torch.Tensor, beams: int) -> torch.Tensor:
    return model.generate(pixel_values=images, num_beams=beams, do_sample=False, max_new_tokens=STEPS,
                          min_new_tokens=STEPS)


def check_full_length(out: torch.Tensor, who: str) -> None:
    """Equal work is the premise of the comparison: refuse numbers from a short decode."""
    body = out[:, -STEPS:]
    if out.shape[1] < STEPS or bool((body == PAD_ID).any() | (body == EOS_ID).any()):
        raise RuntimeError(f"{who} did not decode {STEPS} tokens per caption; the timings would not be comparable")


# --- measuring ------------------------------------------------------------------------
def measure_decoding(model, s: Settings, image_size: int, hf=None) -> tuple[dict, dict | None]:
    """b1 greedy/beam (FastCap and its HF twin interleaved) and batch greedy throughput."""
    dev = s.device
    x1 = torch.randn(1, 3, image_size, image_size, device=dev)
    xb = torch.randn(s.batch, 3, image_size, image_size, device=dev)
    fns = {"greedy": lambda: model.greedy(x1), "beam": lambda: model.beam_search(x1, BEAM),
           "encode": lambda: model.encode(x1)}
    check_full_length(model.greedy(x1), "FastCap greedy")
    check_full_length(model.beam_search(x1, BEAM), "FastCap beam search")
    if hf is not None:
        fns["hf_greedy"] = lambda: hf_generate(hf, x1, 1)
        fns["hf_beam"] = lambda: hf_generate(hf, x1, BEAM)
        fns["hf_encode"] = lambda: hf.encoder(pixel_values=x1)
        check_full_length(hf_generate(hf, x1, 1), "HF greedy")
        check_full_length(hf_generate(hf, x1, BEAM), "HF beam search")
    b1 = interleaved(fns, s.repeats_b1, s.warmup, dev)
    bfns = {"batch": lambda: model.greedy(xb)}
    if hf is not None:
        bfns["hf_batch"] = lambda: hf_generate(hf, xb, 1)
    bb = interleaved(bfns, s.repeats_batch, 1, dev)
    fc = {"greedy_ms": b1["greedy"] * 1e3, "beam_ms": b1["beam"] * 1e3, "batch_ips": s.batch / bb["batch"],
          "encode_ms": b1["encode"] * 1e3}
    other = None
    if hf is not None:
        other = {"greedy_ms": b1["hf_greedy"] * 1e3, "beam_ms": b1["hf_beam"] * 1e3,
                 "batch_ips": s.batch / bb["hf_batch"], "encode_ms": b1["hf_encode"] * 1e3}
    return fc, other


def measure_training(fc_step: Callable[[], None], s: Settings, hf_step: Callable[[], None] | None = None) -> tuple:
    fns = {"fc": fc_step}
    if hf_step is not None:
        fns["hf"] = hf_step
    t = interleaved(fns, s.repeats_batch, 1, s.device)
    return s.batch / t["fc"], (s.batch / t["hf"] if hf_step is not None else None)


def bench_size(size: str, s: Settings, use_hf: bool, log: Callable[[str], None]) -> list[Row]:
    dev = s.device
    model = build_fastcap(size, dev)
    image_size = model.cfg.encoder.image_size
    rows = [Row(f"FastCap {size}", params=model.num_params() / 1e6, ckpt_mb=saved_mb(model.state_dict()),
                step_mb=decoder_step_mb(model))]
    x1 = torch.randn(1, 3, image_size, image_size, device=dev)
    with torch.inference_mode():
        rows[0].gflops = count_gflops(lambda: model.greedy(x1))
    hf = build_hf(size, dev) if use_hf else None
    if hf is not None:
        hrow = Row(f"HF ViT+GPT-2 (~{size})", params=sum(p.numel() for p in hf.parameters()) / 1e6,
                   ckpt_mb=saved_mb(hf.state_dict()))
        with torch.inference_mode():
            hrow.gflops = count_gflops(lambda: hf_generate(hf, x1, 1))
        rows.append(hrow)
    log(f"  {size}: decoding")
    with torch.inference_mode():
        fc, other = measure_decoding(model, s, image_size, hf)
    for k, v in fc.items():
        setattr(rows[0], k, v)
    if other is not None:
        for k, v in other.items():
            setattr(rows[1], k, v)
    log(f"  {size}: training")
    batch = caption_batch(s.batch, image_size, dev)
    train_model = build_fastcap(size, dev)
    hf_train = build_hf(size, dev) if use_hf else None
    fc_ips, hf_ips = measure_training(fastcap_train_step(train_model, batch), s,
                                      hf_train_step(hf_train, batch) if hf_train is not None else None)
    rows[0].train_ips = fc_ips
    if hf is not None:
        rows[1].train_ips = hf_ips
    del train_model, hf_train

    if size in s.quant_sizes:
        for kind in ("int8", "mixed"):
            log(f"  {size}: {kind}")
            label = f"FastCap {size} int8" if kind == "int8" else f"FastCap {size} mixed 4/8"
            try:
                q, mb, summary = quantized(model, kind)
            except ImportError as e:
                rows.append(Row(label, note=f"TODO: fastcap.quant.convert unavailable ({e})"))
                continue
            with torch.inference_mode():
                fc, _ = measure_decoding(q, s, image_size)
            rows.append(Row(label, params=rows[0].params, gflops=rows[0].gflops, ckpt_mb=mb, note=summary, **fc))
    return rows


# --- report ---------------------------------------------------------------------------
def fmt(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(rows: list[Row], s: Settings, peak: float, hf_note: str | None, load: tuple, quick: bool,
           seconds: float, bandwidth: float | None = None) -> str:
    cols = [c.format(B=s.batch) for c in COLUMNS]
    dev = s.device
    where = (f"{torch.cuda.get_device_name(dev)} (CUDA, fp32)" if dev.type == "cuda"
             else f"CPU {cpu_name()}, {s.threads} thread(s), fp32")
    lines = [
        "# FastCap benchmark" + (" (quick mode: tiny only, 2 repeats; numbers are not meaningful)" if quick else ""),
        "",
        f"Measured {dt.datetime.now():%Y-%m-%d %H:%M} in one run of `experiments/benchmark.py"
        f"{' --quick' if quick else ''}` ({seconds:.0f} s) on **{dev.type}**: {where}; "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}. "
        f"Load average (1 min) {load[0]:.2f} at start, {load[1]:.2f} at end: "
        "the machine is shared, other jobs may have been running.",
        "",
        f"Machine matmul peak: **{peak:,.1f} GFLOP/s** (2048x2048 fp32 `torch.mm`, median of {s.peak_repeats})"
        + (f"; batch-1 weight streaming: **{bandwidth:,.1f} GB/s** (fp32 GEMVs over 64 MB of weights)."
           if bandwidth else "."),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|",
    ]
    for r in rows:
        frac = None
        if r.gflops is not None and r.batch_ips is not None and peak > 0:
            frac = 100 * r.gflops * r.batch_ips / peak
        cells = [r.name, fmt(r.params, 2), fmt(r.gflops, 3), fmt(r.ckpt_mb, 2), fmt(r.greedy_ms), fmt(r.beam_ms),
                 fmt(r.batch_ips), fmt(r.train_ips), fmt(frac)]
        if r.note.startswith("TODO"):
            cells[1:] = ["TODO"] * (len(cols) - 1)
        lines.append("| " + " | ".join(cells) + " |")

    pairs = [(r, h) for r in rows for h in rows
             if h.name.startswith("HF ") and h.name.endswith(f"(~{r.name.split()[1]})") and r.name.count(" ") == 1]
    lines += ["", "## FastCap vs Hugging Face VisionEncoderDecoder (same size, same work)", ""]
    if pairs:
        lines += ["| size | params FastCap / HF (M) | greedy b1 speedup | beam3 b1 speedup | "
                  f"greedy b{s.batch} speedup | training speedup |", "|---|---:|---:|---:|---:|---:|"]
        for r, h in pairs:
            def ratio(a: float | None, b: float | None) -> str:
                return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}x"
            lines.append(f"| {r.name.split()[1]} | {r.params:.2f} / {h.params:.2f} | {ratio(h.greedy_ms, r.greedy_ms)}"
                         f" | {ratio(h.beam_ms, r.beam_ms)} | {ratio(r.batch_ips, h.batch_ips)} | "
                         f"{ratio(r.train_ips, h.train_ips)} |")
        lines += ["", "Speedup = HF time / FastCap time (or FastCap img/s / HF img/s). "
                  "Goal: >= 3x greedy b1, >= 2.5x beam3 b1."]
    else:
        lines.append(f"Skipped: {hf_note}" if hf_note else "Skipped (no Hugging Face rows requested).")

    floor_rows = [r for r in rows if r.step_mb and r.greedy_ms is not None and r.encode_ms is not None]
    if bandwidth and floor_rows:
        hf_by_size = {h.name.split("~")[1].rstrip(")"): h for h in rows if h.name.startswith("HF ")}
        lines += ["", "## Where batch-1 decoding time goes", "",
                  "At batch 1 every decoding step reads all decoder and output-head weights once. At the measured "
                  "streaming bandwidth (weights coming from DRAM) that alone takes the 19-step floor below, whatever "
                  "the library; weights that stay in the CPU's last-level cache can beat it. Decode = greedy b1 time "
                  "minus encode time.", "",
                  "| size | weights read per step (MB) | 19-step floor (ms) | FastCap greedy decode (ms) | "
                  "HF greedy decode (ms) | FastCap encode (ms) | HF encode (ms) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in floor_rows:
            size = r.name.split()[1]
            h = hf_by_size.get(size)
            floor = STEPS * r.step_mb / 1e3 / bandwidth * 1e3
            hf_dec = None if h is None or h.greedy_ms is None else h.greedy_ms - h.encode_ms
            lines.append(f"| {size} | {r.step_mb:.1f} | {floor:.1f} | {r.greedy_ms - r.encode_ms:.1f} | "
                         f"{fmt(hf_dec)} | "
                         f"{r.encode_ms:.1f} | {fmt(None if h is None else h.encode_ms)} |")

    notes = [
        f"Models are randomly initialised from `conf/model/fastcap_*.yaml` with a COCO-sized vocabulary of "
        f"{VOCAB:,} tokens (not the built-in data's) and max_len {MAX_LEN}: 19 decoding steps after BOS.",
        "Equal work: every caption is decoded to the full 19 tokens. FastCap's EOS logit is biased to -1e4 so it "
        "never stops early; Hugging Face `generate()` gets `max_new_tokens=min_new_tokens=19`. Each run checks "
        "that no caption came out shorter.",
        "Hugging Face twin: `VisionEncoderDecoderModel` built from a `ViTConfig` (same image size, patch size, "
        "width, depth, heads, MLP 4x) and a `GPT2Config` with cross-attention (same d_model, layers, heads, "
        "MLP 4x, vocabulary, 20 positions, untied output head), random init, no download, SDPA attention, "
        "KV cache on (its default). Same threads, same device, fp32, both under `torch.inference_mode()`.",
        f"Timings are medians over {s.repeats_b1} (batch 1) / {s.repeats_batch} (batch {s.batch}, training) runs "
        f"after warm-up, FastCap and HF interleaved run by run. ms/img at batch 1 includes encoding the image.",
        "GFLOPs/caption: `torch.utils.flop_counter` over encode + greedy decode of one image (attention counted "
        "through the math SDPA backend); quantized rows do the same arithmetic as their float model. "
        f"% of matmul peak = GFLOPs/caption x greedy b{s.batch} img/s / peak.",
        "Checkpoint MB: `torch.save` of the float state dict; for int8 / mixed rows of "
        "`fastcap.quant.quantized_state` (int8 codes, int4 packed two per byte, fp32 per-channel scales).",
        f"Training: forward + backward + AdamW step at batch {s.batch} images x {CAPTIONS_PER_IMAGE} captions "
        "(fastcap.train.objectives.CrossEntropy; each image encoded once for its 5 captions, HF likewise via "
        "`encoder_outputs`), dropout on, fp32.",
    ]
    quant_notes = [f"{r.name}: {r.note}" for r in rows if r.note]
    if quant_notes:
        notes.append("Quantized rows (`fastcap.quant.convert`, dynamic int8 activations for Linear at >= 4 rows, "
                     "weight-only otherwise): " + " | ".join(quant_notes))
    if hf_note:
        notes.append(f"Hugging Face rows skipped: {hf_note}.")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model only, 2 repeats, batch 8 (for tests)")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "benchmark.md")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every model (default: torch's)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face rows")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.quick:
        s = Settings(["tiny"], ["tiny"], ["tiny"], batch=8, repeats_b1=2, repeats_batch=2, warmup=1,
                     peak_repeats=2, device=device, threads=threads)
    else:
        s = Settings(["tiny", "small", "base"], ["tiny", "small"], ["tiny", "small", "base"], batch=32,
                     repeats_b1=15, repeats_batch=5, warmup=3, peak_repeats=7, device=device, threads=threads)
    hf_note = "--no-hf" if args.no_hf else hf_available()
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"benchmark on {device} with {threads} thread(s)" + (f"; HF rows skipped: {hf_note}" if hf_note else ""))
    peak = matmul_peak(device, s.peak_repeats)
    bandwidth = stream_bandwidth(device, s.peak_repeats)
    rows: list[Row] = []
    for size in s.sizes:
        rows += bench_size(size, s, hf_note is None and size in s.hf_sizes, log)
    # FastCap rows first, then the Hugging Face twins.
    rows.sort(key=lambda r: r.name.startswith("HF "))
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = render(rows, s, peak, hf_note, (load0, load1), args.quick, time.perf_counter() - t0, bandwidth)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    log(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()

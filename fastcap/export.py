"""python -m fastcap.export checkpoint=PATH format=onnx|torchscript output=DIR

Exports a float FastCap checkpoint as two graphs plus a manifest, for inference without FastCap:

    encoder.{onnx,pt}       images [B,3,S,S] (normalised like fastcap.data.transforms.eval_transform)
                            -> memory [B,M,D], cross_k_0, cross_v_0, ... [B,H,M,D/H]
    decoder_step.{onnx,pt}  token [N] int64, pos [] int64, self_k_i / self_v_i [N,H,T,D/H] per layer,
                            cross_k_i / cross_v_i per layer
                            -> logits [N,V], updated self_k_i / self_v_i
    manifest.json           input/output names, shapes, special token ids, image size and
                            normalisation, the vocabulary

The cross-attention keys/values are computed once per image by the encoder graph, as FastCap
does when decoding. The decoder step always sees its whole preallocated cache (T = max_len-1
positions) and masks the positions after `pos`, so its shapes never change while decoding: no
dynamic slicing, which both TorchScript tracing and ONNX handle poorly. Batch size is dynamic.

`ExportedCaptioner` is a pure-Python greedy decoder over the exported files (onnxruntime for
ONNX, torch.jit for TorchScript); `check=true` (the default) decodes a few random images with it
and with the PyTorch model and reports whether the tokens agree.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from fastcap.cli import guarded, plain
from fastcap.data.vocab import BOS_ID, EOS_ID, PAD_ID
from fastcap.model.captioner import FastCap

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
EXPORT_VERSION = 1
# onnxscript is optional: with it torch's torch.export-based exporter runs, without it the TorchScript-based one.
ONNX_HINT = "pip install onnx onnxruntime  (or: pip install 'fastcap[export]')"


class EncoderGraph(nn.Module):
    """images -> memory and every layer's cross-attention K/V."""

    def __init__(self, model: FastCap) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        memory = self.model.encode(images)
        out = [memory]
        for blk in self.model.blocks:
            k, v = blk.cross_attn.memory_kv(memory)
            out += [k.contiguous(), v.contiguous()]
        return tuple(out)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    # Written out (not F.scaled_dot_product_attention) so every exporter and opset takes it as is.
    att = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return att.softmax(-1) @ v


class DecoderStepGraph(nn.Module):
    """One decoding step with static shapes: FastCap.step over a full-length, position-masked cache."""

    def __init__(self, model: FastCap, max_steps: int) -> None:
        super().__init__()
        self.model = model
        self.n_layers = len(model.blocks)
        self.h = model.cfg.n_heads
        self.dh = model.cfg.d_model // self.h
        self.register_buffer("positions", torch.arange(max_steps), persistent=False)

    def forward(self, token: Tensor, pos: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        m, L, h, dh = self.model, self.n_layers, self.h, self.dh
        self_kv, cross_kv = caches[:2 * L], caches[2 * L:]
        n = token.shape[0]
        x = m.tok_emb(token) + m.pos_emb.index_select(0, pos.reshape(1))
        write = (self.positions == pos).view(1, 1, -1, 1)
        visible = (self.positions <= pos).view(1, 1, 1, -1)
        new: list[Tensor] = []
        for i, blk in enumerate(m.blocks):
            qkv = blk.self_attn.qkv(blk.ln1(x)).view(n, 3, h, 1, dh)
            k = torch.where(write, qkv[:, 1], self_kv[2 * i])
            v = torch.where(write, qkv[:, 2], self_kv[2 * i + 1])
            new += [k, v]
            x = x + blk.self_attn.proj(_attend(qkv[:, 0], k, v, visible).reshape(n, h * dh))
            q = blk.cross_attn.q(blk.ln2(x)).view(n, h, 1, dh)
            x = x + blk.cross_attn.proj(_attend(q, cross_kv[2 * i], cross_kv[2 * i + 1]).reshape(n, h * dh))
            x = x + blk.mlp(blk.ln3(x))
        return (m.head(m.ln_f(x)), *new)


def io_names(n_layers: int) -> dict[str, list[str]]:
    cross = [f"cross_{kv}_{i}" for i in range(n_layers) for kv in "kv"]
    self_in = [f"self_{kv}_{i}" for i in range(n_layers) for kv in "kv"]
    return {"encoder_inputs": ["images"], "encoder_outputs": ["memory"] + cross,
            "step_inputs": ["token", "pos"] + self_in + cross,
            "step_outputs": ["logits"] + [f"new_{n}" for n in self_in]}


def example_inputs(model: FastCap, batch: int = 2) -> tuple[tuple[Tensor], tuple[Tensor, ...]]:
    e = model.cfg.encoder
    images = torch.randn(batch, 3, e.image_size, e.image_size)
    with torch.no_grad():
        enc = EncoderGraph(model)(images)
    steps = model.cfg.max_len - 1
    h, dh = model.cfg.n_heads, model.cfg.d_model // model.cfg.n_heads
    caches = [torch.zeros(batch, h, steps, dh) for _ in range(2 * len(model.blocks))]
    step_args = (torch.full((batch,), BOS_ID, dtype=torch.long), torch.tensor(0), *caches, *enc[1:])
    return (images,), step_args


# --- exporters ------------------------------------------------------------------------
def require_onnx() -> None:
    from fastcap.device import ConfigError

    missing = []
    for mod in ("onnx", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ConfigError(f"format=onnx needs {' and '.join(missing)}, not installed here: {ONNX_HINT}. "
                          "format=torchscript needs only torch")


def _onnx_export(graph: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                 batch_dims: dict[str, int], opset: int) -> None:
    dynamic_axes = {name: {axis: "batch"} for name, axis in batch_dims.items()}
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's backend)
        has_onnxscript = True
    except ImportError:
        has_onnxscript = False
    errors = []
    # torch.export-based exporter first; the TorchScript-based one where onnxscript is missing or fails.
    for dynamo in ([True] if has_onnxscript else []) + [False]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(graph, args, str(path), input_names=inputs, output_names=outputs,
                                  dynamic_axes=dynamic_axes, opset_version=opset, dynamo=dynamo,
                                  external_data=False, verbose=False)
            return
        except Exception as e:  # exporter internals raise many types; report them all below
            errors.append(f"{'dynamo' if dynamo else 'legacy'} exporter: {type(e).__name__}: {str(e)[:300]}")
    raise RuntimeError(f"ONNX export of {path.name} failed:\n  " + "\n  ".join(errors))


def export_model(model: FastCap, fmt: str, output: str | Path, vocab: list[str] | None = None,
                 opset: int = 18) -> Path:
    """Write encoder + decoder-step graphs and manifest.json to `output`; returns the manifest path.

    Exports run on the CPU: `model` is moved there and put in eval mode.
    """
    from fastcap.data.transforms import MEAN, STD
    from fastcap.device import ConfigError

    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not supported; use one of {sorted(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    model = model.cpu().eval()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    L = len(model.blocks)
    names = io_names(L)
    steps = model.cfg.max_len - 1
    enc_graph, step_graph = EncoderGraph(model).eval(), DecoderStepGraph(model, steps).eval()
    enc_args, step_args = example_inputs(model)
    ext = FORMATS[fmt]
    enc_path, step_path = out / f"encoder{ext}", out / f"decoder_step{ext}"
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            # torch.jit is deprecated in favour of torch.export, but TorchScript is the format asked for.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.jit.save(torch.jit.trace(enc_graph, enc_args), str(enc_path))
            torch.jit.save(torch.jit.trace(step_graph, step_args), str(step_path))
    else:
        enc_dims = {n: 0 for n in names["encoder_inputs"] + names["encoder_outputs"]}
        step_dims = {n: 0 for n in names["step_inputs"] + names["step_outputs"] if n != "pos"}
        _onnx_export(enc_graph, enc_args, enc_path, names["encoder_inputs"], names["encoder_outputs"], enc_dims, opset)
        _onnx_export(step_graph, step_args, step_path, names["step_inputs"], names["step_outputs"], step_dims, opset)
    cfg = model.cfg
    manifest = {
        "fastcap_export": EXPORT_VERSION,
        "format": fmt,
        "encoder": {"file": enc_path.name, "inputs": names["encoder_inputs"], "outputs": names["encoder_outputs"]},
        "decoder_step": {"file": step_path.name, "inputs": names["step_inputs"], "outputs": names["step_outputs"]},
        "image_size": cfg.encoder.image_size,
        "normalize": {"mean": list(MEAN), "std": list(STD)},
        "n_layers": L,
        "n_heads": cfg.n_heads,
        "d_head": cfg.d_model // cfg.n_heads,
        "max_steps": steps,
        "vocab_size": cfg.vocab_size,
        "special_ids": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID},
        "model_config": cfg.to_dict(),
        "vocab": vocab,
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path


# --- driver -----------------------------------------------------------------------------
class ExportedCaptioner:
    """Greedy captioning with the exported graphs alone (onnxruntime or torch.jit), in numpy.

    Mirrors FastCap.greedy: tokens [B, steps] without BOS, PAD after EOS, stops when every
    caption has ended.
    """

    def __init__(self, directory: str | Path) -> None:
        d = Path(directory)
        self.manifest = json.loads((d / "manifest.json").read_text())
        m = self.manifest
        self.format = m["format"]
        self.enc_in, self.enc_out = m["encoder"]["inputs"], m["encoder"]["outputs"]
        self.step_in, self.step_out = m["decoder_step"]["inputs"], m["decoder_step"]["outputs"]
        if self.format == "onnx":
            require_onnx()
            import onnxruntime as ort

            opts = ort.SessionOptions()
            # Match torch's threads so comparisons and benchmarks use the same CPU share.
            opts.intra_op_num_threads = torch.get_num_threads()
            prov = ["CPUExecutionProvider"]
            self._enc = ort.InferenceSession(str(d / m["encoder"]["file"]), opts, providers=prov)
            self._step = ort.InferenceSession(str(d / m["decoder_step"]["file"]), opts, providers=prov)
        elif self.format == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self._enc = torch.jit.load(str(d / m["encoder"]["file"]), map_location="cpu").eval()
                self._step = torch.jit.load(str(d / m["decoder_step"]["file"]), map_location="cpu").eval()
        else:
            raise ValueError(f"{d / 'manifest.json'}: unknown export format {self.format!r}")

    def _run(self, which: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if self.format == "onnx":
            sess, names = (self._enc, self.enc_in) if which == "encoder" else (self._step, self.step_in)
            return sess.run(None, dict(zip(names, inputs)))
        graph = self._enc if which == "encoder" else self._step
        with torch.inference_mode():
            outs = graph(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))
        return [o.numpy() for o in outs]

    def greedy(self, images: np.ndarray | Tensor, max_len: int | None = None) -> np.ndarray:
        m = self.manifest
        if isinstance(images, Tensor):
            images = images.detach().cpu().numpy()
        images = np.ascontiguousarray(images, dtype=np.float32)
        total = m["max_steps"]
        steps = total if max_len is None else min(max_len, total + 1) - 1
        enc = self._run("encoder", [images])
        cross = enc[1:]
        n = images.shape[0]
        caches = [np.zeros((n, m["n_heads"], total, m["d_head"]), np.float32) for _ in range(2 * m["n_layers"])]
        out = np.full((n, steps), PAD_ID, np.int64)
        tok = np.full((n,), BOS_ID, np.int64)
        done = np.zeros(n, bool)
        for t in range(steps):
            logits, *caches = self._run("step", [tok, np.array(t, np.int64), *caches, *cross])
            tok = np.where(done, PAD_ID, logits.argmax(-1)).astype(np.int64)
            out[:, t] = tok
            done |= tok == EOS_ID
            if done.all():
                break
        return out

    def captions(self, images: np.ndarray | Tensor) -> list[str]:
        from fastcap.data.vocab import Vocab

        if not self.manifest.get("vocab"):
            raise ValueError("this export has no vocabulary in manifest.json")
        vocab = Vocab(self.manifest["vocab"])
        return [vocab.decode(s) for s in self.greedy(images).tolist()]


def compare(model: FastCap, directory: str | Path, n_images: int = 4, seed: int = 0) -> tuple[int, int]:
    """(captions whose exported greedy tokens equal model.greedy's, captions compared) on random images."""
    size = model.cfg.encoder.image_size
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    ref = model.cpu().eval().greedy(images).numpy()
    got = ExportedCaptioner(directory).greedy(images)
    same = sum(bool(np.array_equal(a, b)) for a, b in zip(ref, got))
    return same, n_images


def run_export(cfg: dict) -> Path:
    from fastcap.device import ConfigError
    from fastcap.model.load import load_captioner, require_float

    fmt = str(cfg.get("format"))
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not supported; use one of {sorted(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    if not cfg.get("checkpoint"):
        raise ConfigError("usage: python -m fastcap.export checkpoint=PATH format=onnx|torchscript output=DIR")
    model, vocab, state = load_captioner(cfg["checkpoint"], "cpu")
    require_float(state, cfg["checkpoint"], "export")
    path = export_model(model, fmt, cfg["output"], vocab.itos, int(cfg.get("opset", 18)))
    print(f"exported {fmt}: {path.parent}/ ({', '.join(sorted(p.name for p in path.parent.iterdir()))})")
    if cfg.get("check", True):
        same, n = compare(model, path.parent, int(cfg.get("check_images", 4)))
        msg = f"check: exported greedy captions equal PyTorch's on {same}/{n} random images"
        print(msg if same == n else f"warning: {msg} (float rounding differs between runtimes; "
              "near-tied tokens can flip)", file=sys.stderr if same != n else sys.stdout)
    return path


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    guarded(lambda: run_export(plain(cfg)))


if __name__ == "__main__":
    main()

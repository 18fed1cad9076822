"""Export: TorchScript / ONNX graphs decode the same captions as the PyTorch model; clear errors."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from conftest import run_cli
from fastcap.data.vocab import SPECIALS, Vocab
from fastcap.device import ConfigError
from fastcap.export import ExportedCaptioner, export_model, require_onnx, run_export
from fastcap.model.captioner import FastCap, ModelConfig
from fastcap.train.checkpoint import CheckpointError, save_checkpoint

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def tiny_model(seed: int = 0, vocab: int = 40) -> FastCap:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict({"encoder": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                                 "d_model": 32, "n_layers": 2, "n_heads": 2, "max_len": 12, "vocab_size": vocab})
    return FastCap(cfg).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model()
    vocab = Vocab(list(SPECIALS) + [f"w{i}" for i in range(model.cfg.vocab_size - len(SPECIALS))])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth.tar"
    save_checkpoint({"model": model.state_dict(), "model_config": model.cfg.to_dict(), "vocab": vocab.itos,
                     "kind": "float", "stage": "scratch"}, path)
    return path, model


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def assert_same_captions(directory, model: FastCap) -> None:
    driver = ExportedCaptioner(directory)
    for x in (images(5), images(1, seed=2)):  # batch sizes other than the traced one (2)
        np.testing.assert_array_equal(driver.greedy(x), model.greedy(x).numpy())
    x = images(3, seed=3)
    np.testing.assert_array_equal(driver.greedy(x, max_len=6), model.greedy(x, max_len=6).numpy())


def test_torchscript_export_decodes_like_pytorch(checkpoint, tmp_path):
    path, model = checkpoint
    manifest = run_export({"checkpoint": str(path), "format": "torchscript", "output": str(tmp_path), "check": False})
    assert {p.name for p in tmp_path.iterdir()} == {"encoder.pt", "decoder_step.pt", "manifest.json"}
    assert manifest.name == "manifest.json"
    assert_same_captions(tmp_path, model)
    assert ExportedCaptioner(tmp_path).captions(images(2))[0].split()[0].startswith("w")


@pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxruntime not installed (pip install onnx onnxruntime)")
def test_onnx_export_decodes_like_pytorch(checkpoint, tmp_path):
    path, model = checkpoint
    run_export({"checkpoint": str(path), "format": "onnx", "output": str(tmp_path), "check": False})
    assert {p.name for p in tmp_path.iterdir()} == {"encoder.onnx", "decoder_step.onnx", "manifest.json"}
    assert_same_captions(tmp_path, model)


def test_cli_exports_and_checks(checkpoint, tmp_path):
    path, _ = checkpoint
    r = run_cli([f"checkpoint={path}", "format=torchscript", f"output={tmp_path / 'ts'}"], module="fastcap.export")
    assert r.returncode == 0, r.stderr
    assert "equal PyTorch's on 4/4" in r.stdout
    assert (tmp_path / "ts" / "decoder_step.pt").is_file()


def test_cli_missing_checkpoint_is_the_checkpoint_error(tmp_path):
    r = run_cli([f"checkpoint={tmp_path / 'nope.pth.tar'}", "format=torchscript", f"output={tmp_path}"],
                module="fastcap.export")
    assert r.returncode == 2
    assert "checkpoint not found" in r.stderr and "Traceback" not in r.stderr


def test_unknown_format_is_a_clear_error(checkpoint, tmp_path):
    path, model = checkpoint
    with pytest.raises(ConfigError, match="format='tflite' is not supported.*onnx.*torchscript"):
        run_export({"checkpoint": str(path), "format": "tflite", "output": str(tmp_path)})
    with pytest.raises(ConfigError, match="not supported"):
        export_model(model, "tflite", tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        run_export({"checkpoint": str(tmp_path / "missing.pt"), "format": "torchscript", "output": str(tmp_path)})


def test_onnx_without_onnxruntime_says_what_to_install(monkeypatch, checkpoint, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ConfigError, match="pip install onnx onnxruntime"):
        require_onnx()
    with pytest.raises(ConfigError, match="format=torchscript needs only torch"):
        run_export({"checkpoint": str(checkpoint[0]), "format": "onnx", "output": str(tmp_path)})


# The export is checked against model.greedy, which runs FastCap's fused eval-mode step; these pin
# that step (and beam search on it) to the module-by-module `step` the exported graphs reproduce.
def test_fast_decode_step_matches_module_step():
    model = tiny_model(4)
    memory = model.encode(images(3))
    with torch.no_grad():
        c1, kv1 = model.init_state(memory, 11)
        c2, kv2 = model.init_state(memory, 11)
        plan = model._step_plan()
        assert plan is not None
        tok = torch.full((3,), 1)
        for t in range(6):
            fast, ref = model._fast_step(plan, tok, c1, kv1, t), model.step(tok, c2, kv2, t)
            torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)
            tok = ref.argmax(-1)


def test_fast_path_decodes_like_module_path():
    model = tiny_model(5)
    x = images(4, seed=5)
    fast = model.greedy(x), model.beam_search(x, beam_size=3), model.sample(x, 2, greedy=True)
    hook = model.head.register_forward_hook(lambda *a: None)  # hooks force the module-by-module path
    try:
        with torch.no_grad():
            assert model._step_plan() is None
        slow = model.greedy(x), model.beam_search(x, beam_size=3), model.sample(x, 2, greedy=True)
    finally:
        hook.remove()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)

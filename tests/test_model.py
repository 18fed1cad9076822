"""Decoding correctness: cached == uncached, beam 1 == greedy, batched == one by one; model sizes."""
from __future__ import annotations

import pytest
import torch

from omegaconf import OmegaConf

from conftest import CONF
from fastcap.data.vocab import BOS_ID, EOS_ID, PAD_ID
from fastcap.model.captioner import FastCap, ModelConfig


def tiny_model(seed: int = 0, vocab: int = 40) -> FastCap:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict({"encoder": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                                 "d_model": 32, "n_layers": 2, "n_heads": 2, "max_len": 12, "vocab_size": vocab})
    return FastCap(cfg).eval()


def uncached_greedy(model: FastCap, images: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding that recomputes the whole prefix every step (no cache)."""
    memory = model.encode(images)
    seq = torch.full((len(images), 1), BOS_ID)
    done = torch.zeros(len(images), dtype=torch.bool)
    out = []
    for _ in range(steps):
        tok = model.decode_logits(memory, seq)[:, -1].argmax(-1).masked_fill(done, PAD_ID)
        out.append(tok)
        done |= tok == EOS_ID
        seq = torch.cat([seq, tok[:, None]], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_greedy_equals_uncached(seed):
    model = tiny_model(seed)
    images = torch.randn(4, 3, 32, 32)
    cached = model.greedy(images)
    ref = uncached_greedy(model, images, cached.shape[1])
    assert torch.equal(cached, ref)


def test_cached_step_logits_match_full_forward():
    model = tiny_model()
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(4, 40, (2, 6))
    tokens[:, 0] = BOS_ID
    memory = model.encode(images)
    full = model.decode_logits(memory, tokens)
    caches, kv = model.init_state(memory, 11)
    for t in range(tokens.shape[1]):
        step = model.step(tokens[:, t], caches, kv, t)
        torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=1e-4)


def test_beam_one_equals_greedy():
    model = tiny_model()
    images = torch.randn(5, 3, 32, 32)
    assert torch.equal(model.beam_search(images, beam_size=1), model.greedy(images))


def test_batched_equals_one_by_one():
    model = tiny_model()
    images = torch.randn(4, 3, 32, 32)
    for decode in (lambda x: model.greedy(x), lambda x: model.beam_search(x, beam_size=3)):
        batched = decode(images)
        single = torch.cat([decode(images[i:i + 1]) for i in range(4)])
        assert torch.equal(batched, single)


def test_beam_search_finds_at_least_the_greedy_log_probability():
    model = tiny_model(3)
    images = torch.randn(3, 3, 32, 32)

    def logprob(seqs):
        inp = torch.cat([torch.full((len(seqs), 1), BOS_ID), seqs[:, :-1]], 1)
        lp = model.decode_logits(model.encode(images), inp).log_softmax(-1).gather(-1, seqs[..., None])[..., 0]
        return (lp * (seqs != PAD_ID)).sum(-1)

    with torch.no_grad():
        assert (logprob(model.beam_search(images, beam_size=4)) >= logprob(model.greedy(images)) - 1e-4).all()


@pytest.mark.parametrize("name,lo,hi", [("fastcap_tiny", 1.0, 2.0), ("fastcap_small", 5.0, 8.0),
                                        ("fastcap_base", 18.0, 23.0), ("fastcap_large", 36.0, 44.0)])
def test_model_sizes(name, lo, hi):
    real = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
    model = FastCap(ModelConfig.from_dict({**real, "vocab_size": 120}))
    assert lo <= model.num_params() / 1e6 <= hi


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_backbones(arch):
    torch.manual_seed(0)
    model = FastCap(ModelConfig.from_dict({"encoder": {"arch": arch, "image_size": 64}, "d_model": 32,
                                           "n_layers": 1, "n_heads": 2, "vocab_size": 30}))
    out = model.greedy(torch.randn(2, 3, 64, 64))
    assert out.shape[0] == 2


def test_pretrained_weights_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torch.hub

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(RuntimeError, match="checkpoints"):
        FastCap(ModelConfig.from_dict({"encoder": {"arch": "resnet18", "pretrained": True}, "vocab_size": 30}))

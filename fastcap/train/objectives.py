"""Training objectives: what a stage optimises, given a batch.

An objective is a callable `(model, batch) -> (loss, logs)`; the loop knows
nothing else about it. Cross-entropy and self-critical sequence training live
here; distillation (fastcap.distill) is another objective of the same shape.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcap.data.vocab import BOS_ID, EOS_ID, PAD_ID


def unwrap(model: nn.Module) -> nn.Module:
    """The FastCap module inside DDP / compile wrappers."""
    return getattr(model, "module", model)


def token_targets(tokens: Tensor) -> Tensor:
    """[B, K, T] caption tokens -> next-token targets [B*K, T-1]."""
    return tokens.reshape(-1, tokens.shape[-1])[:, 1:]


class CrossEntropy:
    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict]:
        logits = model(batch["image"], batch["tokens"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), token_targets(batch["tokens"]).flatten(),
                               ignore_index=PAD_ID, label_smoothing=self.label_smoothing)
        return loss, {"loss": loss.detach()}


def sequence_mask(seqs: Tensor) -> Tensor:
    """1 for tokens up to and including the first EOS, 0 after (PAD)."""
    return (seqs != PAD_ID).float()


def strip(seq: list[int]) -> list[int]:
    out = []
    for t in seq:
        if t in (EOS_ID, PAD_ID):
            break
        out.append(t)
    return out


class SelfCritical:
    """SCST (Rennie et al. 2017) with a CIDEr-D reward.

    baseline='mean': K samples per image, each baselined by the mean reward of
    the other K-1 (Luo 2020, "a better variant of SCST"); 'greedy': the greedy
    caption's reward, as in the original paper.
    """

    def __init__(self, cider, samples: int = 5, baseline: str = "mean", max_len: int | None = None,
                 temperature: float = 1.0) -> None:
        if baseline not in ("mean", "greedy"):
            raise ValueError(f"training.scst.baseline must be 'mean' or 'greedy', got '{baseline}'")
        if baseline == "mean" and samples < 2:
            raise ValueError("training.scst.samples must be >= 2 with the mean baseline")
        self.cider, self.k, self.baseline = cider, samples, baseline
        self.max_len, self.temperature = max_len, temperature

    def __call__(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict]:
        net = unwrap(model)
        images, index = batch["image"], batch["index"].tolist()
        memory = net.encode(images)
        with torch.no_grad():
            seqs = net.sample(images, self.k, self.max_len, self.temperature, memory=memory.detach())
            t0 = time.perf_counter()
            ref_idx = [i for i in index for _ in range(self.k)]
            reward = torch.as_tensor(self.cider.scores([strip(s) for s in seqs.tolist()], ref_idx),
                                     dtype=torch.float32, device=images.device).view(-1, self.k)
            if self.baseline == "mean":
                base = (reward.sum(1, keepdim=True) - reward) / (self.k - 1)
            else:
                greedy = net.sample(images, 1, self.max_len, greedy=True, memory=memory.detach())
                base = torch.as_tensor(self.cider.scores([strip(s) for s in greedy.tolist()], index),
                                       dtype=torch.float32, device=images.device)[:, None]
            reward_s = time.perf_counter() - t0
        inp = torch.cat([torch.full_like(seqs[:, :1], BOS_ID), seqs[:, :-1]], dim=1)
        logits = net.decode_logits(memory.repeat_interleave(self.k, dim=0), inp)
        logp = logits.float().log_softmax(-1).gather(-1, seqs[..., None])[..., 0]
        mask = sequence_mask(seqs)
        adv = (reward - base).view(-1, 1)
        loss = -(adv * logp * mask).sum() / mask.sum().clamp(min=1)
        return loss, {"loss": loss.detach(), "reward": reward.mean(), "reward_s": reward_s}

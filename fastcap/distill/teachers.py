"""Teachers: frozen FastCap models loaded from their own checkpoints.

Each checkpoint carries its model config and vocabulary, so a teacher is
rebuilt exactly as it was trained; the student may differ in every size.

Vocabulary policy: MAPPING. Teachers fine-tuned with vocab_mode=extend can
know words the student does not, and vice versa. Words are matched by their
text:
  * the student's token ids are re-encoded into the teacher's ids before the
    teacher reads them (student words the teacher lacks become the teacher's
    <unk>);
  * the teacher's next-token distribution is projected onto the student's
    vocabulary by gathering its logits at the mapped ids; student words the
    teacher lacks get zero probability, and the softmax over the gathered
    logits renormalises the rest (teacher-only words drop out);
  * teacher captions (sequence-level KD) are mapped back word by word, unknown
    words becoming the student's <unk>.
Special tokens share ids 0-3 in every FastCap vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcap.data.vocab import UNK_ID, Vocab
from fastcap.device import ConfigError
from fastcap.model.captioner import FastCap
from fastcap.model.load import build_from_state
from fastcap.train.checkpoint import CheckpointError, load_checkpoint

# Logit given to student words the teacher does not know: exp() of it is exactly 0 at any sane
# temperature, yet it stays finite so 0 * log(0) never turns into NaN. Fits in fp16 for the cache.
MASKED_LOGIT = -6.0e4


class VocabMap:
    """Token-id maps between a student and a teacher vocabulary (see the module docstring)."""

    def __init__(self, student: Vocab, teacher: Vocab) -> None:
        self.identical = student.itos == teacher.itos
        s2t = [teacher.stoi.get(w, -1) for w in student.itos]
        self.missing = sum(1 for i in s2t if i < 0)  # student words the teacher cannot predict
        self.teacher_only = sum(1 for w in teacher.itos if w not in student.stoi)
        self.s2t_gather = torch.tensor([max(i, 0) for i in s2t])
        self.s2t_known = torch.tensor([i >= 0 for i in s2t])
        self.s2t_input = torch.tensor([i if i >= 0 else UNK_ID for i in s2t])
        self.t2s = torch.tensor([student.stoi.get(w, UNK_ID) for w in teacher.itos])

    def to(self, device: torch.device) -> "VocabMap":
        for k in ("s2t_gather", "s2t_known", "s2t_input", "t2s"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def student_to_teacher_ids(self, tokens: Tensor) -> Tensor:
        return tokens if self.identical else self.s2t_input[tokens]

    def teacher_to_student_ids(self, tokens: Tensor) -> Tensor:
        return tokens if self.identical else self.t2s[tokens]

    def project_logits(self, logits: Tensor) -> Tensor:
        """Teacher logits [..., V_teacher] -> logits over the student vocabulary [..., V_student]."""
        if self.identical:
            return logits
        out = logits.index_select(-1, self.s2t_gather)
        return out.masked_fill(~self.s2t_known, MASKED_LOGIT)


@dataclass
class Teacher:
    path: str
    model: FastCap
    vocab: Vocab
    vmap: VocabMap
    score: float            # val CIDEr stored in the checkpoint (best_score)
    num_params: int

    @property
    def image_size(self) -> int:
        return self.model.cfg.encoder.image_size

    @torch.no_grad()
    def forward(self, images: Tensor, tokens: Tensor, return_hidden: bool = False):
        """Teacher outputs for the student's batch: images resized to the teacher's input size,
        student token ids re-encoded into the teacher's ids. Logits are projected onto the student vocabulary."""
        dtype = next(self.model.parameters()).dtype
        images = self.resize(images).to(dtype)
        out = self.model(images, self.vmap.student_to_teacher_ids(tokens), return_hidden=return_hidden)
        if return_hidden:
            logits, hidden, attn = out
            return self.vmap.project_logits(logits.float()), hidden.float(), attn.float()
        return self.vmap.project_logits(out.float())

    def resize(self, images: Tensor) -> Tensor:
        if images.shape[-1] == self.image_size and images.shape[-2] == self.image_size:
            return images
        # The batch is already normalised; resizing is linear, so resize-then-normalise is the same.
        return F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False, antialias=True)


def load_teacher(path: str | Path, student_vocab: Vocab, device: torch.device, *, bf16: bool = False) -> Teacher:
    """Build a frozen, eval-mode teacher from a float FastCap checkpoint."""
    state = load_checkpoint(path)  # CheckpointError names the file when missing / corrupt / foreign
    if state.get("kind") == "quantized":
        raise CheckpointError(f"training.teachers: {path} is a quantized model; teachers must be float "
                              "checkpoints (e.g. the best_checkpoint.pth.tar of a float training stage)")
    for key in ("model", "model_config", "vocab"):
        if key not in state:
            raise CheckpointError(f"training.teachers: {path} has no '{key}' entry, so it cannot be rebuilt "
                                  "as a teacher (use a checkpoint written by a FastCap training stage)")
    vocab = Vocab(state["vocab"])
    model = build_from_state(state, f"teacher checkpoint {path}")
    model.requires_grad_(False)
    model.eval()
    if bf16:
        model.to(torch.bfloat16)
    model.to(device)
    score = state.get("best_score")
    score = float(score) if isinstance(score, (int, float)) else float("-inf")
    return Teacher(path=str(path), model=model, vocab=vocab, vmap=VocabMap(student_vocab, vocab).to(device),
                   score=score, num_params=model.num_params())


def order_teachers(teachers: list[Teacher], order: str) -> list[Teacher]:
    """Weakest first: by the checkpoints' val CIDEr ('score') or as listed ('given')."""
    if order == "given":
        return list(teachers)
    if order != "score":
        raise ConfigError(f"training.distill.order={order!r}: use 'score' or 'given'")
    unscored = [t.path for t in teachers if t.score == float("-inf")]
    if unscored and len(teachers) > 1:
        raise ConfigError(f"training.distill.order=score, but {unscored} store no val score (best_score); "
                          "list the teachers weakest first and set training.distill.order=given")
    return sorted(teachers, key=lambda t: t.score)  # stable: equal scores keep the given order

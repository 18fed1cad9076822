"""Progressive Multi-Teacher Distillation (PMTD).

    python -m fastcap training=distill training.teachers=[A.pth.tar,B.pth.tar] model=fastcap_tiny

`build_pmtd` loads the teachers named by `training.teachers`, orders them
weakest to strongest and returns the objective the training loop optimises
(the loss is written out in fastcap/distill/objective.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fastcap.data.vocab import Vocab
from fastcap.device import ConfigError
from fastcap.distill.config import DistillConfig
from fastcap.distill.objective import PMTDObjective, visual_tokens
from fastcap.distill.schedule import SCHEDULES, teacher_weights
from fastcap.distill.teachers import Teacher, VocabMap, load_teacher, order_teachers
from fastcap.train.objectives import unwrap

__all__ = ["build_pmtd", "DistillConfig", "PMTDObjective", "SCHEDULES", "Teacher", "VocabMap", "load_teacher",
           "order_teachers", "teacher_weights"]


def build_pmtd(tcfg: dict, *, student: nn.Module, vocab: Vocab, train_records: list, device: torch.device,
               log: Callable = print, data: dict | None = None) -> PMTDObjective:
    """The PMTD objective for `student`, from the training config (`teachers`, `distill`, ...).

    `data` (the data config, optional) lets a bad cache setting fail before any teacher is loaded;
    without it the cache checks each image as it goes.
    """
    cfg = DistillConfig.from_dict(tcfg.get("distill"))
    paths = tcfg.get("teachers") or []
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ConfigError("training.mode=pmtd needs teacher checkpoints: set training.teachers=[A.pth.tar,B.pth.tar] "
                          "(float checkpoints of trained FastCap models, e.g. their best_checkpoint.pth.tar)")
    if cfg.cache_teacher_logits and data is not None and data.get("augment", True):
        raise ConfigError("training.distill.cache_teacher_logits=true needs data.augment=false: augmented images "
                          "change every epoch, so cached teacher outputs would be wrong")
    net = unwrap(student)
    s_cfg = net.cfg
    s_params = net.num_params()
    teachers = []
    for path in paths:
        # Building a model draws its random init; keep the global RNG as the student left it, so the
        # student's dropout stream is the same as in a plain (undistilled) run with the same seed.
        with torch.random.fork_rng(devices=[]):
            t = load_teacher(path, vocab, device, bf16=cfg.teacher_bf16)
        t_cfg = t.model.cfg
        if t_cfg.max_len < s_cfg.max_len - 1:
            raise ConfigError(f"teacher {path} reads at most {t_cfg.max_len} tokens but the student's captions "
                              f"have up to {s_cfg.max_len - 1} inputs: use model.max_len <= {t_cfg.max_len + 1}")
        if t.num_params < s_params:
            log(f"warning: teacher {path} has {t.num_params / 1e6:.2f}M parameters, fewer than the student's "
                f"{s_params / 1e6:.2f}M: a smaller teacher rarely helps")
        if not t.vmap.identical:
            log(f"teacher {path}: vocabulary differs from the student's ({len(t.vocab)} vs {len(vocab)} tokens); "
                f"mapped by word: {t.vmap.missing} student word(s) unknown to it get zero teacher probability, "
                f"{t.vmap.teacher_only} teacher-only word(s) are dropped")
        if cfg.alpha_attention > 0:
            n_t, n_s = visual_tokens(t.model), visual_tokens(net)
            if n_t != n_s:
                raise ConfigError(f"training.distill.alpha_attention > 0 aligns cross-attention maps, which needs "
                                  f"as many visual tokens in teacher and student: teacher {path} has {n_t}, the "
                                  f"student {n_s}. Set training.distill.alpha_attention=0 or match "
                                  "encoder.image_size / patch_size")
        teachers.append(t)
    teachers = order_teachers(teachers, cfg.order)
    log("PMTD teachers, weakest first: " + "; ".join(
        f"{j}: {t.path} ({t.model.cfg.name}, {t.num_params / 1e6:.2f}M params, val CIDEr {t.score:.4f})"
        for j, t in enumerate(teachers)))
    log(f"PMTD: schedule {cfg.schedule}, T={cfg.temperature}, alpha ce/kd/hidden/attention/seq = "
        f"{cfg.alpha_ce}/{cfg.alpha_kd}/{cfg.alpha_hidden}/{cfg.alpha_attention}/{cfg.alpha_seq}"
        + (", confidence weighting" if cfg.confidence_weighting else "")
        + (f", top-{cfg.top_k} teacher logits" if cfg.top_k else "")
        + (" (cached)" if cfg.cache_teacher_logits else ""))
    with torch.random.fork_rng(devices=[]):
        objective = PMTDObjective(
            cfg, teachers, student_dim=s_cfg.d_model, student_max_len=s_cfg.max_len, num_train=len(train_records),
            num_epochs=int(tcfg.get("num_epochs", 1)), grad_accum=int(tcfg.get("grad_accum", 1)),
            max_steps=int(tcfg.get("max_steps", 0) or 0), label_smoothing=float(tcfg.get("label_smoothing", 0.0)),
            log=log)
    return objective.to(device)

"""The `training.distill` block as a checked dataclass (keys documented in conf/training/distill.yaml)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from fastcap.device import ConfigError
from fastcap.distill.schedule import SCHEDULES

ORDERS = ("score", "given")


@dataclass
class DistillConfig:
    temperature: float = 2.0
    alpha_ce: float = 0.5
    alpha_kd: float = 0.5
    alpha_hidden: float = 0.0
    alpha_attention: float = 0.0
    alpha_seq: float = 0.0
    schedule: str = "linear"
    confidence_weighting: bool = False
    order: str = "score"
    teacher_bf16: bool = False
    cache_teacher_logits: bool = False
    top_k: int = 0
    seq_beam_size: int = 3

    @classmethod
    def from_dict(cls, d: dict | None) -> "DistillConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training.distill key(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        key = "training.distill."
        if not self.temperature > 0:
            raise ConfigError(f"{key}temperature={self.temperature}: the softmax temperature must be > 0 "
                              "(1 = plain distributions; 2-4 is usual for distillation)")
        for name in ("alpha_ce", "alpha_kd", "alpha_hidden", "alpha_attention", "alpha_seq"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}{name}={getattr(self, name)}: loss weights must be >= 0")
        if self.alpha_ce + self.alpha_kd + self.alpha_hidden + self.alpha_attention + self.alpha_seq <= 0:
            raise ConfigError(f"{key}alpha_*: all loss weights are 0, so nothing would be trained")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{key}schedule={self.schedule!r}: use one of {SCHEDULES}")
        if self.order not in ORDERS:
            raise ConfigError(f"{key}order={self.order!r}: use 'score' (weakest to strongest by the "
                              "checkpoints' val CIDEr) or 'given' (the order of training.teachers)")
        if self.top_k < 0:
            raise ConfigError(f"{key}top_k={self.top_k}: use 0 (full teacher distribution) or a positive k")
        if self.seq_beam_size < 1:
            raise ConfigError(f"{key}seq_beam_size={self.seq_beam_size}: must be >= 1")
        if self.cache_teacher_logits:
            if self.top_k <= 0:
                raise ConfigError(f"{key}cache_teacher_logits=true stores the teachers' top-k logits: set "
                                  f"{key}top_k > 0 (e.g. 64); the full distribution is too large to keep")
            if self.alpha_hidden > 0 or self.alpha_attention > 0:
                raise ConfigError(f"{key}cache_teacher_logits=true keeps only logits, but alpha_hidden / "
                                  "alpha_attention need the teachers' hidden states every step: set them to 0 "
                                  "or turn the cache off")

    def to_dict(self) -> dict:
        return asdict(self)

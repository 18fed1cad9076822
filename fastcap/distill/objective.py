r"""Progressive Multi-Teacher Distillation (PMTD): the training objective.

For a batch with N = B*K reference captions, non-PAD target positions M, and
teachers j = 0..J-1 ordered weakest to strongest:

    L = a_ce  * CE(student, references)                            (label smoothing as training.label_smoothing)
      + a_kd  * T^2 * sum_j sum_{n,t in M} W_nj * KL(p_j^T(.|n,t) || p_s^T(.|n,t)) / |M|
      + a_hid * sum_j sum_{n,t in M} W_nj * mean_d (P_j h_s(n,t) - h_j(n,t))^2 / |M|
      + a_att * sum_j sum_{n,t in M} W_nj * KL(A_j(n,t) || A_s(n,t)) / |M|
      + a_seq * sum_j w_j(t) * CE(student, beam_j(image))

  p^T = softmax(z / T): temperature-scaled next-token distributions; teacher
      distributions are first projected onto the student's vocabulary (see
      teachers.py) and, with top_k > 0, cut to their k most likely tokens and
      renormalised. The T^2 factor keeps the KD gradients' scale independent of T.
  w_j(t): the curriculum weight of teacher j at progress t = step / total steps
      (schedule.py: step / linear / cosine move weight weakest -> strongest;
      average = 1/J, plain multi-teacher KD).
  W_nj = w_j(t) without confidence weighting; with it (CA-MKD style), per caption n
      W_nj = w_j(t) exp(-CE_nj) / sum_i w_i(t) exp(-CE_ni), CE_nj = teacher j's mean
      per-token cross-entropy on reference n (T = 1, each token's capped at 30 nats),
      so a teacher that predicts the reference better counts more for that caption.
  P_j: a learned linear map d_student -> d_teacher_j (this module's parameters);
      h = final-layer decoder hidden states (after the last LayerNorm).
  A = last decoder layer's cross-attention over the visual tokens, averaged over
      heads (so head counts may differ; the number of visual tokens must match).
  beam_j(image): teacher j's beam-search caption (sequence-level KD, Kim & Rush
      2016), computed once per training image without gradients and kept for
      later epochs (with data.augment=true, from the first view of the image:
      a pseudo-reference, like Kim & Rush's once-generated distillation data).

Teachers with w_j(t) = 0 are not run at all for that step.

Progress: `set_progress(p)` sets t directly (the loop can call it with
step / total_steps, which also survives resumption). Until it is called the
objective counts its own calls: t = (calls // grad_accum) / total_steps, with
total_steps estimated from len(train_records), the first batch's size,
training.num_epochs, training.grad_accum and training.max_steps as the loop does.

Cache (cache_teacher_logits): top-k teacher logits (fp16, shifted so the
largest is 0) and the per-caption reference CE are kept per (dataset index,
encoded caption): the dataset picks which captions fill the K slots each epoch,
but a caption's token ids, together with its image, fully determine the
teacher's output, so the key is exact. The image must be the same every epoch
(data.augment=false); a fingerprint of each image is checked on every use and
a changed image stops training with a clear error. The uncached path with the
same top_k uses the same fp16 representation, so caching changes no number.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcap.data.vocab import BOS_ID, EOS_ID, PAD_ID
from fastcap.device import ConfigError
from fastcap.distill.config import DistillConfig
from fastcap.distill.schedule import teacher_weights
from fastcap.distill.teachers import MASKED_LOGIT, Teacher
from fastcap.train.objectives import strip, token_targets, unwrap

NLL_CAP = 30.0  # nats; a reference word the teacher cannot produce must not send its weight to exactly 0 * inf


# --- loss terms on plain tensors (unit-tested) ------------------------------------------------------------------

def kl_per_position(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(p_teacher^T || p_student^T) summed over the vocabulary: [..., V] -> [...]."""
    logp_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    logp_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (logp_t.exp() * (logp_t - logp_s)).sum(-1)


def kl_topk_per_position(student_logits: Tensor, values: Tensor, indices: Tensor, temperature: float) -> Tensor:
    """KL with the teacher cut to its top-k tokens (values/indices [..., k]) and renormalised over them."""
    logp_s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, indices.long())
    logp_t = F.log_softmax(values.float() / temperature, dim=-1)
    return (logp_t.exp() * (logp_t - logp_s)).sum(-1)


def topk_logits(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest logits, shifted so the largest is 0 (softmax is shift-invariant) and stored as fp16."""
    k = min(k, logits.shape[-1])
    vals, idx = logits.float().topk(k, dim=-1)
    vals = (vals - vals[..., :1]).clamp(min=MASKED_LOGIT).half()
    return vals, idx.to(torch.int16 if logits.shape[-1] <= 32767 else torch.int32)


def reference_nll(teacher_logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean per-token NLL of the reference under the (projected) teacher, per caption: [N, T, V] -> [N]."""
    nll = -F.log_softmax(teacher_logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    return (nll.clamp(max=NLL_CAP) * mask).sum(1) / mask.sum(1).clamp(min=1)


def combine_weights(schedule_w: Tensor, nll: Tensor | None) -> Tensor:
    """Per-caption teacher weights [N, J] from schedule weights [J] and, optionally, reference NLLs [N, J]."""
    if nll is None:
        return schedule_w[None, :]
    # softmax(log w_j - CE_nj): the schedule prior times exp(-CE), renormalised over the teachers;
    # log(0) = -inf keeps a teacher the schedule has switched off at exactly 0 (the weights sum to 1, so
    # at least one entry is finite).
    return F.softmax(schedule_w.log()[None, :] - nll, dim=-1)


def attention_kl(student_attn: Tensor, teacher_attn: Tensor) -> Tensor:
    """KL between head-averaged cross-attention maps [N, H, T, S] -> [N, T]."""
    a_s = student_attn.float().mean(1).clamp(min=1e-8)
    a_t = teacher_attn.float().mean(1).clamp(min=1e-8)
    return (a_t * (a_t.log() - a_s.log())).sum(-1)


# --- the objective ----------------------------------------------------------------------------------------------

class PMTDObjective(nn.Module):
    """`(model, batch) -> (loss, logs)`. An nn.Module because it owns the hidden-state projections P_j
    (only when alpha_hidden > 0): the optimizer must include `self.parameters()`. Teachers are held outside
    the module tree, so neither `parameters()` nor `state_dict()` contain them."""

    def __init__(self, cfg: DistillConfig, teachers: list[Teacher], *, student_dim: int, student_max_len: int,
                 num_train: int, num_epochs: int, grad_accum: int = 1, max_steps: int = 0,
                 label_smoothing: float = 0.0, log: Callable = print) -> None:
        super().__init__()
        if not teachers:
            raise ConfigError("PMTD needs at least one teacher")
        self.cfg, self.log = cfg, log
        self._teachers = list(teachers)  # a plain list: not submodules
        self.student_max_len = student_max_len
        self.label_smoothing = label_smoothing
        self.num_train, self.num_epochs = num_train, max(1, num_epochs)
        self.grad_accum, self.max_steps = max(1, grad_accum), max_steps
        self.proj = nn.ModuleList(nn.Linear(student_dim, t.model.cfg.d_model) for t in teachers) \
            if cfg.alpha_hidden > 0 else None
        self._progress: float | None = None
        self._calls = 0
        self._total_steps: int | None = None
        self._proj_snapshot = [p.detach().clone() for p in self.proj.parameters()] if self.proj is not None else []
        self._proj_checked = False
        self._cache: list[dict] = [{} for _ in teachers]          # (index, caption ids) -> (vals, idx, nll)
        self._beams: list[dict] = [{} for _ in teachers]          # index -> student-id caption row [T]
        self._fingerprints: dict[int, tuple[float, float]] = {}
        self._fp_vec: Tensor | None = None

    @property
    def teachers(self) -> list[Teacher]:
        return self._teachers

    # progress -----------------------------------------------------------------------------------------------
    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] (optimizer step / total steps); overrides the call counting."""
        self._progress = min(1.0, max(0.0, float(progress)))

    def progress(self, batch_size: int) -> float:
        if self._progress is not None:
            return self._progress
        if self._total_steps is None:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            batches = math.ceil(math.ceil(self.num_train / world) / max(1, batch_size))
            total = self.num_epochs * max(1, batches // self.grad_accum)
            self._total_steps = min(total, self.max_steps) if self.max_steps else total
        return min(1.0, (self._calls // self.grad_accum) / self._total_steps)

    def schedule_weights(self, progress: float) -> list[float]:
        return teacher_weights(self.cfg.schedule, progress, len(self._teachers))

    # teacher outputs ----------------------------------------------------------------------------------------
    def _check_images(self, images: Tensor, index: list[int]) -> None:
        """The cache is only valid if an index always shows the same image (no augmentation)."""
        flat = images.detach().flatten(1).double()
        if self._fp_vec is None or self._fp_vec.numel() != flat.shape[1]:
            g = torch.Generator().manual_seed(0)
            self._fp_vec = (0.5 + torch.rand(flat.shape[1], generator=g, dtype=torch.float64)).to(images.device)
        fps = torch.stack([flat @ self._fp_vec, (flat * flat) @ self._fp_vec], 1).cpu().tolist()
        for i, (a, b) in zip(index, fps):
            old = self._fingerprints.get(i)
            if old is None:
                self._fingerprints[i] = (a, b)
            elif abs(a - old[0]) > 1e-5 * max(1.0, b) or abs(b - old[1]) > 1e-5 * max(1.0, b):
                raise ConfigError(
                    f"training.distill.cache_teacher_logits=true, but training image {i} differs from the last "
                    "time it was seen: the cache needs the same image every epoch. Set data.augment=false "
                    "or training.distill.cache_teacher_logits=false")

    def _cached_topk(self, j: int, images: Tensor, tokens: Tensor, index: list[int], targets: Tensor,
                     mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        teacher, cache = self._teachers[j], self._cache[j]
        b, k, _ = tokens.shape
        rows = tokens.cpu().numpy()
        keys = [(index[i], rows[i, s].tobytes()) for i in range(b) for s in range(k)]
        todo = sorted({n // k for n, key in enumerate(keys) if key not in cache})
        if todo:
            sel = torch.tensor(todo, device=tokens.device)
            logits = teacher.forward(images[sel], tokens[sel])
            vals, idx = topk_logits(logits, self.cfg.top_k)
            rows_sel = torch.cat([torch.arange(i * k, (i + 1) * k) for i in todo]).to(tokens.device)
            nll = reference_nll(logits, targets[rows_sel], mask[rows_sel])
            vals, idx, nll = vals.cpu(), idx.cpu(), nll.cpu()
            for r, n in enumerate(rows_sel.tolist()):
                cache.setdefault(keys[n], (vals[r], idx[r], float(nll[r])))
        entries = [cache[key] for key in keys]
        dev = tokens.device
        return (torch.stack([e[0] for e in entries]).to(dev), torch.stack([e[1] for e in entries]).to(dev),
                torch.tensor([e[2] for e in entries], device=dev))

    def _beam_rows(self, j: int, images: Tensor, index: list[int]) -> Tensor:
        """Teacher j's beam caption per image as student token rows [B, T] (BOS ... EOS, PAD)."""
        teacher, beams = self._teachers[j], self._beams[j]
        todo = [n for n, i in enumerate(index) if i not in beams]
        if todo:
            sel = torch.tensor(todo, device=images.device)
            dtype = next(teacher.model.parameters()).dtype
            with torch.no_grad():
                seqs = teacher.model.beam_search(teacher.resize(images[sel]).to(dtype), self.cfg.seq_beam_size)
            seqs = teacher.vmap.teacher_to_student_ids(seqs).cpu().tolist()
            for n, seq in zip(todo, seqs):
                words = strip(seq)[: self.student_max_len - 2]
                row = torch.full((self.student_max_len,), PAD_ID, dtype=torch.long)
                row[: len(words) + 2] = torch.tensor([BOS_ID, *words, EOS_ID])
                beams[index[n]] = row
        return torch.stack([beams[i] for i in index]).to(images.device)

    def _warn_if_projections_frozen(self) -> None:
        if self.proj is None or self._proj_checked or self._calls <= 2 * self.grad_accum:
            return
        self._proj_checked = True
        moved = any(not torch.equal(p.detach(), s.to(p.device)) for p, s in
                    zip(self.proj.parameters(), self._proj_snapshot))
        if not moved:
            self.log("warning: training.distill.alpha_hidden > 0 but the hidden-state projections are not being "
                     "updated: the optimizer must include the distillation objective's parameters()")

    # the loss -----------------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict]:
        cfg, T = self.cfg, self.cfg.temperature
        images, tokens = batch["image"], batch["tokens"]
        index = batch["index"].tolist()
        b, k, _ = tokens.shape
        targets = token_targets(tokens)
        mask = (targets != PAD_ID).float()
        n_tok = mask.sum().clamp(min=1)

        p = self.progress(b)
        self._calls += 1
        self._warn_if_projections_frozen()
        sched = self.schedule_weights(p)
        active = [j for j, w in enumerate(sched) if w > 0]
        sched_a = torch.tensor([sched[j] for j in active], device=images.device)

        # One student forward for references and teacher captions: one image encoding, and DDP sees one pass.
        seq_rows = [self._beam_rows(j, images, index) for j in active] if cfg.alpha_seq > 0 else []
        all_tokens = torch.cat([tokens, torch.stack(seq_rows, 1)], 1) if seq_rows else tokens
        need_hidden = cfg.alpha_hidden > 0 or cfg.alpha_attention > 0
        out = model(images, all_tokens, return_hidden=need_hidden)
        logits, hidden, attn = out if need_hidden else (out, None, None)
        rows = all_tokens.shape[1]
        pick = lambda x: x.view(b, rows, *x.shape[1:])[:, :k].reshape(b * k, *x.shape[1:])  # noqa: E731
        ref_logits = pick(logits)

        ce = F.cross_entropy(ref_logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD_ID,
                             label_smoothing=self.label_smoothing)
        zero = ce.new_zeros(())
        kd = hid = att = seq = zero
        logs: dict = {"ce": ce.detach(), "progress": p}
        w_mean = [0.0] * len(sched)

        if cfg.alpha_kd > 0 or cfg.alpha_hidden > 0 or cfg.alpha_attention > 0:
            if cfg.cache_teacher_logits:
                self._check_images(images, index)
            kl_rows, nll_rows, extras = [], [], []
            for j in active:
                teacher = self._teachers[j]
                if cfg.cache_teacher_logits:
                    vals, idx, nll = self._cached_topk(j, images, tokens, index, targets, mask)
                    kl = kl_topk_per_position(ref_logits, vals, idx, T)
                    extras.append(None)
                else:
                    t_out = teacher.forward(images, tokens, return_hidden=need_hidden)
                    t_logits = t_out[0] if need_hidden else t_out
                    if cfg.top_k > 0:
                        vals, idx = topk_logits(t_logits, cfg.top_k)
                        kl = kl_topk_per_position(ref_logits, vals, idx, T)
                    else:
                        kl = kl_per_position(ref_logits, t_logits, T)
                    nll = reference_nll(t_logits, targets, mask) if cfg.confidence_weighting else None
                    extras.append(t_out[1:] if need_hidden else None)
                kl_rows.append((kl * mask).sum(1))
                nll_rows.append(nll)
            nll_mat = torch.stack(nll_rows, 1) if cfg.confidence_weighting else None
            W = combine_weights(sched_a, nll_mat).expand(b * k, len(active))
            for a, j in enumerate(active):
                w_mean[j] = float(W[:, a].mean())
            kd = (W * torch.stack(kl_rows, 1)).sum() / n_tok
            if cfg.alpha_hidden > 0 or cfg.alpha_attention > 0:
                h_s, a_s = pick(hidden), pick(attn)
                for a, j in enumerate(active):
                    h_t, a_t = extras[a]
                    if cfg.alpha_hidden > 0:
                        mse = (self.proj[j](h_s.float()) - h_t).pow(2).mean(-1)
                        hid = hid + (W[:, a] * (mse * mask).sum(1)).sum() / n_tok
                    if cfg.alpha_attention > 0:
                        akl = attention_kl(a_s, a_t)
                        att = att + (W[:, a] * (akl * mask).sum(1)).sum() / n_tok
        else:
            for a, j in enumerate(active):
                w_mean[j] = float(sched_a[a])

        if seq_rows:
            seq_logits = logits.view(b, rows, *logits.shape[1:])[:, k:]
            seq_targets = all_tokens[:, k:, 1:]
            for a in range(len(active)):
                ce_j = F.cross_entropy(seq_logits[:, a].flatten(0, 1).float(), seq_targets[:, a].flatten(),
                                       ignore_index=PAD_ID)
                seq = seq + sched_a[a] * ce_j

        loss = (cfg.alpha_ce * ce + cfg.alpha_kd * T * T * kd + cfg.alpha_hidden * hid
                + cfg.alpha_attention * att + cfg.alpha_seq * seq)
        logs["loss"] = loss.detach()
        if cfg.alpha_kd > 0:
            logs["kd"] = kd.detach()
        if cfg.alpha_hidden > 0:
            logs["hidden"] = hid.detach()
        if cfg.alpha_attention > 0:
            logs["attention"] = att.detach()
        if cfg.alpha_seq > 0:
            logs["seq"] = seq.detach()
        for j, w in enumerate(w_mean):
            logs[f"w_teacher{j}"] = w
        return loss, logs


def visual_tokens(model: nn.Module) -> int:
    """Number of visual tokens the model's encoder yields (a dummy forward; no RNG is consumed)."""
    net = unwrap(model)
    size = net.cfg.encoder.image_size
    param = next(net.parameters())
    devices = [param.device] if param.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        return net.encoder(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)).shape[1]

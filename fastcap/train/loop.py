"""The one training loop, shared by every stage (scratch, pretrain, finetune, distill, qat).

Stages differ by config and by the objective passed in, never by a copy of
this loop. It reads top to bottom: per epoch, per batch: forward through the
objective, backward, clip, step; at epoch end: throughput, validation,
checkpoints, early stopping.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from fastcap.data.coco import collate
from fastcap.train.checkpoint import rng_state, save_checkpoint, set_rng_state
from fastcap.train.objectives import unwrap


class TrainingError(Exception):
    """Training cannot go on (NaN loss, ...); the message says what to change."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: a resumable checkpoint was written to `path`."""

    def __init__(self, signum: int, path: Path) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; resumable checkpoint written to {path}")
        self.signum, self.path = signum, path


@dataclass
class LoopConfig:
    stage: str = "scratch"
    num_epochs: int = 10
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    batch_size: int = 32
    num_workers: int = 0
    pin_memory: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16, already resolved for the device
    val_every: int = 1
    save_every_steps: int = 0
    patience: int = 0
    ema_decay: float = 0.0
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit); for smoke runs
    seed: int = 0
    log_every: int = 10


def cosine_schedule(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # No weight decay on biases, norms and positional tables (1-D or named pos): standard practice.
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "pos" not in n else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so the save is never torn."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict = {}

    def __enter__(self) -> "_StopFlag":
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def fit(model: nn.Module, objective: Callable, train_set: Dataset, cfg: LoopConfig, *,
        validate: Callable[[nn.Module, int, bool], dict] | None, ckpt_dir: Path,
        checkpoint_extra: dict, resume: dict | None = None, logger=None, device: torch.device,
        rank: int = 0, world: int = 1, log=print) -> dict:
    """Train `model` with `objective`; returns the best validation metrics (with 'epoch').

    `validate(model, epoch, final)` returns pycocoevalcap scores; the best by CIDEr
    gives best_checkpoint.pth.tar. `resume` is a checkpoint of this same stage to
    continue exactly (epoch, step, optimizer, scheduler, scaler, RNG, best score).
    """
    net = unwrap(model)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    # An objective may own trainable parameters (distillation's hidden-state projections).
    extra = [p for p in objective.parameters() if p.requires_grad] if isinstance(objective, nn.Module) else []
    if extra:
        optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    batches_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum)
    total_steps = cfg.num_epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(min(cfg.warmup_steps, total_steps // 2), total_steps, cfg.min_lr_ratio))
    use_amp = cfg.precision in ("bf16", "fp16")
    amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    ema = None
    if cfg.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay))

    epoch, step, batch_in_epoch = 0, 0, 0
    best, best_score, bad_epochs = {}, -math.inf, 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        if ema is not None and resume.get("ema"):
            ema.load_state_dict(resume["ema"])
        if isinstance(objective, nn.Module) and resume.get("objective"):
            objective.load_state_dict(resume["objective"])
        epoch, step, batch_in_epoch = resume["epoch"], resume["step"], resume["batch_in_epoch"]
        best, best_score = resume.get("best_metrics", {}), resume.get("best_score", -math.inf)
        bad_epochs = resume.get("bad_epochs", 0)
        set_rng_state(resume["rng"])
        log(f"resumed {cfg.stage} at epoch {epoch + 1}, step {step} (best CIDEr so far {best_score:.4f})")

    def state(kind: str) -> dict:
        return {**checkpoint_extra, "stage": cfg.stage, "kind": kind, "model": net.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "ema": ema.state_dict() if ema is not None else None,
                "objective": objective.state_dict() if isinstance(objective, nn.Module) else None,
                "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "rng": rng_state(),
                "best_score": best_score, "best_metrics": best, "bad_epochs": bad_epochs}

    def save(name: str) -> Path:
        return save_checkpoint(state("float"), ckpt_dir / name) if rank == 0 else ckpt_dir / name

    flops_per_image = None
    done = False
    with _StopFlag() as stop:
        while epoch < cfg.num_epochs and not done:
            sampler.set_epoch(epoch)
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)
            order = list(sampler)
            batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
            # A private generator keeps DataLoader from drawing on the global RNG, which dropout uses.
            loader = DataLoader(train_set, batch_sampler=batches[batch_in_epoch:], collate_fn=collate,
                                num_workers=cfg.num_workers, pin_memory=cfg.pin_memory,
                                generator=torch.Generator(), persistent_workers=False)
            model.train()
            bar = tqdm(loader, desc=f"{cfg.stage} epoch {epoch + 1}/{cfg.num_epochs}", initial=batch_in_epoch,
                       total=len(batches), disable=rank != 0, dynamic_ncols=True, mininterval=1.0)
            n_images, skipped, loss_sum, loss_n, extra_s = 0, 0, 0.0, 0, 0.0
            t0 = time.perf_counter()
            for batch in bar:
                skipped += batch["skipped"]
                if "image" not in batch:
                    batch_in_epoch += 1
                    continue
                batch = _to_device(batch, device)
                counter = FlopCounterMode(display=False) if flops_per_image is None else contextlib.nullcontext()
                if hasattr(objective, "set_progress"):  # curricula (PMTD) follow the schedule's progress
                    objective.set_progress(step / max(1, total_steps))
                with counter:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        loss, logs = objective(model, batch)
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"loss is {loss.item()} at epoch {epoch + 1}, step {step}: training diverged. "
                            f"Lower training.lr (now {cfg.lr}), keep training.grad_clip > 0, or use "
                            "training.precision=fp32")
                    scaler.scale(loss / cfg.grad_accum).backward()
                if flops_per_image is None:
                    flops_per_image = counter.get_total_flops() / len(batch["image"])
                batch_in_epoch += 1
                n_images += len(batch["image"])
                loss_sum += float(logs["loss"])
                loss_n += 1
                extra_s += float(logs.get("reward_s", 0.0))
                if batch_in_epoch % cfg.grad_accum and batch_in_epoch < len(batches):
                    continue
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(list(model.parameters()) + extra, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(net)
                step += 1
                lr = scheduler.get_last_lr()[0]
                ips = n_images / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
                if logger is not None and step % cfg.log_every == 0:
                    logger.log({"train/loss": float(logs["loss"]), "train/lr": lr, "train/images_per_s": ips,
                                **{f"train/{k}": float(v) for k, v in logs.items() if k not in ("loss",)}},
                               step=step)
                if stop.signum:
                    path = save("checkpoint.pth.tar")
                    raise Interrupted(stop.signum, path)
                if cfg.save_every_steps and step % cfg.save_every_steps == 0:
                    save("checkpoint.pth.tar")
                if cfg.max_steps and step >= cfg.max_steps:
                    done = True
                    break
            bar.close()
            elapsed = time.perf_counter() - t0
            mean_loss = loss_sum / max(1, loss_n)
            if world > 1:
                t = torch.tensor([mean_loss], device=device)
                dist.all_reduce(t)
                mean_loss = t.item() / world
            ips = n_images * world / max(elapsed, 1e-9)
            gflops = (flops_per_image or 0) * ips / 1e9
            log(f"epoch {epoch + 1}: loss {mean_loss:.4f}, {ips:.1f} images/s, {gflops:.1f} GFLOP/s achieved"
                + (f", reward {100 * extra_s / elapsed:.1f}% of step time" if extra_s else ""))
            if skipped:
                log(f"warning: skipped {skipped} unreadable image(s) this epoch (data.skip_bad_images=true)")
            if logger is not None:
                logger.log({"train/epoch_loss": mean_loss, "train/epoch_images_per_s": ips,
                            "train/gflops_per_s": gflops, "epoch": epoch + 1}, step=step)
            epoch += 1
            batch_in_epoch = 0
            last = epoch >= cfg.num_epochs or done
            if validate is not None and (epoch % cfg.val_every == 0 or last):
                eval_model = ema.module if ema is not None else net
                try:
                    metrics = validate(eval_model, epoch, last) if rank == 0 else {}
                except Exception:
                    if stop.signum:  # Ctrl-C also reaches the Java scorers and breaks validation
                        raise Interrupted(stop.signum, save("checkpoint.pth.tar")) from None
                    raise
                if world > 1:
                    box = [metrics]
                    dist.broadcast_object_list(box, src=0)
                    metrics = box[0]
                score = metrics.get("CIDEr", -math.inf)
                if score > best_score:
                    best_score, best, bad_epochs = score, {**metrics, "epoch": epoch}, 0
                    if ema is not None:
                        save_checkpoint({**state("float"), "model": ema.module.state_dict()},
                                        ckpt_dir / "best_checkpoint.pth.tar") if rank == 0 else None
                    else:
                        save("best_checkpoint.pth.tar")
                else:
                    bad_epochs += 1
                if cfg.patience and bad_epochs >= cfg.patience and not last:
                    log(f"early stopping: val CIDEr has not improved for {bad_epochs} validation(s)")
                    done = True
            save("checkpoint.pth.tar")
            if stop.signum:
                raise Interrupted(stop.signum, ckpt_dir / "checkpoint.pth.tar")
    return best

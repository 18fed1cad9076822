"""The training recipe: a plain function over the resolved config.

Every stage (scratch, pretrain, finetune, distill, qat) goes through `train()`;
what differs is the data, the checkpoint it starts from, the objective and a
small stage hook (distillation builds teachers, QAT swaps in fake-quant layers).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastcap.data.coco import CaptionDataset
from fastcap.data.splits import DataConfig, load_splits, references
from fastcap.data.transforms import eval_transform, train_transform
from fastcap.data.vocab import EOS_ID, Vocab, tokenize
from fastcap.device import ConfigError, resolve_device, resolve_precision
from fastcap.eval.decode import DecodeConfig, decode_records, evaluate_records, write_report
from fastcap.logger import LoggerConfig, build_logger
from fastcap.model.captioner import FastCap, ModelConfig
from fastcap.quant import strip_qat_state
from fastcap.train.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from fastcap.train.loop import LoopConfig, fit
from fastcap.train.objectives import CrossEntropy, SelfCritical


@dataclass
class Job:
    """Where this run writes and how it is named (from Hydra, or set by a test)."""
    out_dir: Path
    name: str = "run"
    group: str | None = None


def loop_config(tcfg: dict, data: DataConfig, precision: str, seed: int) -> LoopConfig:
    names = {f.name for f in fields(LoopConfig)}
    cfg = LoopConfig(**{k: v for k, v in tcfg.items() if k in names})
    cfg.precision, cfg.seed = precision, seed
    cfg.batch_size, cfg.num_workers, cfg.pin_memory = data.batch_size, data.num_workers, data.pin_memory
    return cfg


def grow_vocab_rows(weights: dict, model: FastCap) -> dict:
    """Pad the embedding / output rows of a checkpoint to the model's larger vocabulary.

    New rows keep the model's fresh initialisation; old rows keep their trained values.
    """
    own = model.state_dict()
    out = dict(weights)
    for k in ("tok_emb.weight", "head.weight", "head.bias"):
        if k in weights and weights[k].shape[0] < own[k].shape[0]:
            grown = own[k].clone()
            grown[: weights[k].shape[0]] = weights[k]
            out[k] = grown
    return out


def same_architecture(a: dict, b: dict) -> bool:
    strip = lambda d: {k: v for k, v in d.items() if k not in ("vocab_size", "name", "dropout")}
    return strip(a) == strip(b)


def distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def train(cfg: dict, job: Job, log=print) -> dict:
    """Run one training stage as configured; returns the best val metrics (pycocoevalcap names + epoch)."""
    tcfg, stage = cfg["training"], cfg["training"]["stage"]
    rank, world = distributed()
    device = resolve_device(cfg["device"])
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    precision = resolve_precision(tcfg["precision"], device)
    seed = cfg["seed"]
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    out_dir = Path(job.out_dir)
    ckpt_dir = out_dir / "checkpoints"

    data_cfg = DataConfig.from_dict(cfg["data"])
    splits = load_splits(data_cfg, ("train", "val"), log=log)
    train_recs, val_recs = splits["train"], splits["val"]
    train_caps = lambda: (c for r in train_recs for c in r.captions)  # noqa: E731  (a corpus may not fit in RAM)

    start = load_checkpoint(tcfg["resume_checkpoint"]) if tcfg.get("resume_checkpoint") else None
    if start is not None and start.get("kind") == "quantized":
        raise CheckpointError(f"{tcfg['resume_checkpoint']} is a quantized model; training.resume_checkpoint "
                              "needs a float checkpoint (e.g. best_checkpoint.pth.tar of a float stage)")
    model_cfg = ModelConfig.from_dict(cfg["model"])
    continuing = (start is not None and start.get("stage") == stage
                  and same_architecture(start["model_config"], model_cfg.to_dict()))
    if start is None:
        vocab = Vocab.build(train_caps(), data_cfg.min_word_count)
    else:
        vocab = Vocab(start["vocab"])
        if not continuing and tcfg.get("vocab_mode", "keep") == "extend":
            grown = vocab.extended(train_caps(), data_cfg.min_word_count)
            log(f"vocabulary extended from {len(vocab)} to {len(grown)} tokens with the new data's words")
            vocab = grown
        elif not continuing:
            n = unknown = 0
            for c in train_caps():
                for w in tokenize(c):
                    n, unknown = n + 1, unknown + (w not in vocab.stoi)
            oov = unknown / max(1, n)
            log(f"using the checkpoint's vocabulary ({len(vocab)} tokens); {100 * oov:.2f}% of training "
                "words are unknown to it (training.vocab_mode=extend would add them)")
    model_cfg.vocab_size = len(vocab)
    model = FastCap(model_cfg)
    if start is not None:
        # QAT checkpoints carry activation-range buffers that the plain model gets only from the QAT hook.
        load_model_weights(model, grow_vocab_rows(strip_qat_state(start["model"]), model),
                           strict=tcfg.get("strict_load", True),
                           source=f"checkpoint {tcfg['resume_checkpoint']}", log=log)
        if not continuing:
            log(f"loaded weights of a '{start.get('stage')}' checkpoint from {tcfg['resume_checkpoint']}; "
                f"starting a fresh '{stage}' optimisation (epoch 1, new optimizer and schedule)")
    log(f"FastCap {model_cfg.name}: {model.num_params() / 1e6:.2f}M parameters "
        f"(encoder {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M), vocab {len(vocab)}, "
        f"device {device}, precision {precision}")

    extra = {"model_config": model_cfg.to_dict(), "vocab": vocab.itos, "config": cfg}
    from fastcap.train import stages  # stage hooks: distillation teachers, QAT layers
    hook = stages.build(stage, tcfg, cfg, model=model, vocab=vocab, train_records=train_recs,
                        device=device, out_dir=out_dir, start=start, extra=extra, log=log)
    model = hook.model.to(device)
    if continuing:
        model.load_state_dict(start["model"])  # now with any stage-specific buffers
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)

    objective = hook.objective or build_objective(tcfg, vocab, train_recs, model_cfg.max_len)
    ds_args = dict(max_len=model_cfg.max_len, seq_per_img=data_cfg.seq_per_img, seed=seed,
                   skip_bad_images=data_cfg.skip_bad_images)
    if data_cfg.cache_features:
        train_set = feature_dataset(model, train_recs, vocab, data_cfg, tcfg, device, out_dir, ds_args, log)
    else:
        train_set = CaptionDataset(train_recs, vocab, train_transform(model_cfg.encoder.image_size, data_cfg.augment),
                                   **ds_args)
    ev = cfg["eval"]
    dec = DecodeConfig(beam_size=ev["beam_size"], max_len=model_cfg.max_len, batch_size=ev.get("batch_size", 64))
    val_tf = eval_transform(model_cfg.encoder.image_size)
    val_subset = val_recs[: ev["max_images"]] if ev.get("max_images") else val_recs

    logger = build_logger(LoggerConfig(**cfg["logger"]), rank=rank, out_dir=out_dir, run_name=job.name,
                          group=job.group, job_type=stage, config=cfg)
    from fastcap.eval.metrics import CaptionScorer, format_table

    scorer = CaptionScorer(meteor=ev["meteor"], spice=ev.get("spice", False), log=log) if rank == 0 else None
    val_refs = references(val_recs)

    def validate(m: nn.Module, epoch: int, final: bool) -> dict:
        caps = decode_records(m, val_subset, vocab, val_tf, dec, device, data_cfg.num_workers, data_cfg.skip_bad_images)
        scores, _ = scorer.score({i: val_refs[i] for i in caps}, caps)
        log(f"val epoch {epoch} ({len(caps)} images, beam {dec.beam_size}):\n{format_table(scores)}")
        logger.log({f"val/{k}": v for k, v in scores.items()} | {"epoch": epoch})
        return scores

    exit_code = 1
    try:
        best = fit(model, objective, train_set, loop_config(tcfg, data_cfg, precision, seed), validate=validate,
                   ckpt_dir=ckpt_dir, checkpoint_extra=extra, resume=start if continuing else None,
                   logger=logger, device=device, rank=rank, world=world, log=log)
        if rank == 0:
            best = finalize(model, hook, best, vocab=vocab, val_recs=val_recs, val_subset=val_subset, dec=dec,
                            val_tf=val_tf, scorer=scorer, device=device, out_dir=out_dir, logger=logger,
                            data_cfg=data_cfg, log=log)
        exit_code = 0
    finally:
        if scorer is not None:
            scorer.close()
        logger.finish(exit_code)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return best


def feature_dataset(model, train_recs, vocab, data_cfg: DataConfig, tcfg: dict, device, out_dir: Path, ds_args: dict,
                    log=print):
    from fastcap.data.features import FeatureDataset, cache_features

    net = getattr(model, "module", model)
    if not net.cfg.encoder.freeze or data_cfg.augment or tcfg.get("mode") == "pmtd" or tcfg.get("stage") == "qat":
        raise ConfigError("data.cache_features=true needs model.encoder.freeze=true and data.augment=false (the "
                          "features must not change between epochs), and works with the standard mode only "
                          "(teachers and QAT need the images)")
    feats = cache_features(net.encoder, train_recs, eval_transform(net.cfg.encoder.image_size),
                           out_dir / "feature_cache" / "train.npy", device, log=log)
    return FeatureDataset(feats, train_recs, vocab, **ds_args)


def build_objective(tcfg: dict, vocab: Vocab, train_recs: list, max_len: int):
    name = tcfg.get("objective", "xe")
    if name == "xe":
        return CrossEntropy(tcfg.get("label_smoothing", 0.0))
    if name == "scst":
        from fastcap.eval.cider import CiderD

        refs = [[[t for t in vocab.encode(c, max_len)[1:] if t != EOS_ID] for c in r.captions] for r in train_recs]
        s = tcfg.get("scst", {})
        return SelfCritical(CiderD(refs), samples=s.get("samples", 5), baseline=s.get("baseline", "mean"),
                            max_len=max_len, temperature=s.get("temperature", 1.0))
    raise ConfigError(f"training.objective={name!r}: use 'xe' (cross-entropy) or 'scst' (self-critical CIDEr)")


def finalize(model, hook, best: dict, *, vocab, val_recs, val_subset, dec, val_tf, scorer, device, out_dir: Path,
             logger, data_cfg: DataConfig, log=print) -> dict:
    """Score the best checkpoint on the whole val split; write metrics.json, captions_val.json, the gallery."""
    from fastcap.eval.metrics import format_table

    best_path = out_dir / "checkpoints" / "best_checkpoint.pth.tar"
    if not best_path.exists():
        log("no validation was run, so there is no best checkpoint to score")
        return best
    net = getattr(model, "module", model)
    state = load_checkpoint(best_path)
    net.load_state_dict(state["model"])
    scores, per_image, caps = evaluate_records(net, val_recs, vocab, val_tf, dec, device, scorer,
                                               data_cfg.num_workers, data_cfg.skip_bad_images)
    metrics = {**scores, "epoch": best.get("epoch", state["epoch"]), "num_images": len(caps)}
    if len(val_subset) < len(val_recs):
        metrics["CIDEr_subset"] = best.get("CIDEr")
    log(f"best checkpoint (epoch {metrics['epoch']}) on the full val split ({len(caps)} images):\n"
        f"{format_table(scores)}")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(out_dir, "val", val_recs, caps, per_image, logger)
    logger.summary({f"best/{k}": v for k, v in metrics.items()})
    logger.log_artifact(best_path, "best_checkpoint", "model")
    hook.finish(net, out_dir, metrics)
    return metrics

"""python -m fastcap.quantize: sensitivity analysis, bit allocation, post-training quantization.

    python -m fastcap.quantize checkpoint=checkpoints/best_checkpoint.pth.tar \
        output_path=checkpoints/quantized_model.pth [quantize.avg_bits=5] [quantize.sensitivity=hessian]

Prints per-layer sensitivities and the bit allocation, writes quant_report.json and
sensitivity.png in the run dir, saves the PTQ model at output_path and scores it next
to the float model and an all-int8 PTQ baseline.
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from fastcap.cli import guarded, job_from_hydra, plain


def quantize(cfg: dict, out_dir: Path, job_name: str = "quantize", log=print) -> dict:
    from fastcap.data.splits import DataConfig, load_splits
    from fastcap.data.transforms import eval_transform
    from fastcap.data.vocab import Vocab
    from fastcap.device import ConfigError, resolve_device
    from fastcap.eval.decode import DecodeConfig, evaluate_records
    from fastcap.eval.metrics import CaptionScorer
    from fastcap.logger import LoggerConfig, build_logger
    from fastcap.model.load import build_from_state, require_float
    from fastcap.quant import format_report, model_size_bytes, plot_sensitivity, report_dict
    from fastcap.quant.captioner import QuantConfig, analyse, calibration_batch, ptq, quantized_checkpoint
    from fastcap.train.checkpoint import load_checkpoint, save_checkpoint, saved_size

    if not cfg.get("checkpoint"):
        raise ConfigError("give checkpoint=PATH, the float model to quantize (e.g. .../best_checkpoint.pth.tar)")
    qcfg = QuantConfig.from_dict(cfg["quantize"])
    state = load_checkpoint(cfg["checkpoint"])
    require_float(state, cfg["checkpoint"], "fastcap.quantize")
    device = resolve_device(cfg["device"])
    model = build_from_state(state, f"checkpoint {cfg['checkpoint']}").to(device).eval()
    vocab = Vocab(state["vocab"])
    data_cfg = DataConfig.from_dict(cfg.get("data") or state["config"]["data"])
    splits = load_splits(data_cfg, ("train", "val"), log=log)
    tf = eval_transform(model.cfg.encoder.image_size)
    batch = calibration_batch(splits["train"], vocab, tf, model.cfg.max_len, qcfg.calib_images, device)

    log(f"sensitivity ({qcfg.sensitivity}) of every quantizable layer on {len(batch['image'])} calibration images")
    sens, params, allocation = analyse(model, batch, qcfg, log)
    log(format_report(sens, allocation, params))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = report_dict(sens, allocation, params)
    (out_dir / "quant_report.json").write_text(json.dumps(report, indent=2))
    plot = plot_sensitivity(sens, allocation, out_dir / "sensitivity.png")

    qmodel = ptq(model, allocation, qcfg, batch)
    out_path = Path(cfg.get("output_path") or out_dir / "quantized_model.pth")
    save_checkpoint(quantized_checkpoint(qmodel, state, allocation=allocation, source=str(cfg["checkpoint"])), out_path)
    float_bytes = saved_size(model.state_dict())
    q_bytes = out_path.stat().st_size
    sizes = {"float32_mb": float_bytes / 1e6, "quantized_mb": q_bytes / 1e6, "ratio": q_bytes / float_bytes,
             "quantized_tensor_mb": model_size_bytes(qmodel) / 1e6}
    log(f"PTQ model saved to {out_path}: {q_bytes / 1e6:.2f} MB on disk vs {float_bytes / 1e6:.2f} MB for the "
        f"float32 weights ({100 * q_bytes / float_bytes:.1f}%)")

    results: dict = {"sizes": sizes, "allocation": allocation}
    if cfg.get("evaluate", True):
        val = splits["val"][: cfg.get("eval_images") or None]
        dec = DecodeConfig(**cfg["decode"])
        cpu = torch.device("cpu")
        candidates = {"float": model, "ptq_int8": ptq(model, {k: 8 for k in allocation}, qcfg, batch),
                      "ptq_mixed": qmodel}
        with CaptionScorer(meteor=cfg["eval"]["meteor"], spice=cfg["eval"]["spice"], log=log) as scorer:
            for name, m in candidates.items():
                scores, _, _ = evaluate_records(m.to(cpu), val, vocab, tf, dec, cpu, scorer)
                results[name] = scores
        base = results["float"]["CIDEr"] or 1e-9
        rows = [f"{'model':<10} {'CIDEr':>7} {'BLEU-4':>7} {'% float':>8}"]
        for name in candidates:
            s = results[name]
            rows.append(f"{name:<10} {s['CIDEr']:7.3f} {s['Bleu_4']:7.3f} {100 * s['CIDEr'] / base:7.1f}%")
        log(f"val ({len(val)} images, beam {dec.beam_size}):\n" + "\n".join(rows))
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))

    logger = build_logger(LoggerConfig(**cfg["logger"]), out_dir=out_dir, run_name=job_name, group=None,
                          job_type="quantize", config=cfg)
    try:
        logger.log_image("quantize/sensitivity", plot)
        logger.log_table("quantize/bits", ["layer", "params", "delta_4bit", "delta_8bit", "bits"],
                         [[n, params[n], sens[n].get(4), sens[n].get(8), allocation[n]] for n in allocation])
        logger.summary({f"{k}/{m}": v for k, d in results.items() if k in ("float", "ptq_int8", "ptq_mixed")
                        for m, v in d.items()} | sizes)
        logger.log_artifact(out_path, "quantized_model", "model")
    finally:
        logger.finish()
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="quantize")
def main(cfg: DictConfig) -> None:
    job = job_from_hydra()
    guarded(lambda: quantize(plain(cfg), job.out_dir, job.name))


if __name__ == "__main__":
    main()

"""python -m fastcap.evaluate: score a checkpoint on a split, or an existing COCO results file.

    python -m fastcap.evaluate checkpoint=PATH [split=val|test] [decode.beam_size=3] [data=coco ...]
    python -m fastcap.evaluate results=RESULTS.json annotations=GT.json

Prints the table and writes metrics.json (and captions_<split>.json, gallery.html) in the run dir.
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fastcap.cli import guarded, job_from_hydra, plain


def evaluate(cfg: dict, out_dir: Path, log=print) -> dict:
    from fastcap.data.splits import DataConfig, load_splits
    from fastcap.data.transforms import eval_transform
    from fastcap.device import ConfigError, resolve_device
    from fastcap.eval.decode import DecodeConfig, evaluate_records, write_report
    from fastcap.eval.metrics import CaptionScorer, format_table, score_results_file
    from fastcap.model.load import load_captioner

    out_dir.mkdir(parents=True, exist_ok=True)
    scorer_args = {"meteor": cfg["eval"]["meteor"], "spice": cfg["eval"]["spice"]}
    if cfg.get("results") or cfg.get("annotations"):
        if not (cfg.get("results") and cfg.get("annotations")):
            raise ConfigError("scoring a results file needs both results=RESULTS.json and annotations=GT.json")
        scores = score_results_file(cfg["results"], cfg["annotations"], log=log, **scorer_args)
        what = f"{cfg['results']} against {cfg['annotations']}"
    elif cfg.get("checkpoint"):
        device = resolve_device(cfg["device"])
        model, vocab, state = load_captioner(cfg["checkpoint"], device)
        if state.get("kind") == "quantized" and device.type != "cpu":
            log("quantized model: integer kernels run on the CPU, evaluating there")
            device = resolve_device("cpu")
            model = model.to(device)
        data_cfg = DataConfig.from_dict(cfg.get("data") or state["config"]["data"])
        split = cfg["split"]
        records = load_splits(data_cfg, (split,), log=log)[split]
        dec = DecodeConfig(**cfg["decode"])
        with CaptionScorer(log=log, **scorer_args) as scorer:
            scores, per_image, caps = evaluate_records(model, records, vocab, eval_transform(model.cfg.encoder.image_size),
                                                       dec, device, scorer, data_cfg.num_workers,
                                                       data_cfg.skip_bad_images)
        write_report(out_dir, split, records, caps, per_image)
        what = f"{cfg['checkpoint']} on {data_cfg.name} {split} ({len(caps)} images, beam {dec.beam_size})"
    else:
        raise ConfigError("give checkpoint=PATH (decode and score a split) or results=... annotations=... "
                          "(score a COCO results file)")
    log(f"{what}:\n{format_table(scores)}")
    (out_dir / "metrics.json").write_text(json.dumps(scores, indent=2))
    log(f"metrics written to {out_dir / 'metrics.json'}")
    return scores


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    scores = guarded(lambda: evaluate(plain(cfg), job_from_hydra().out_dir))
    return float(scores.get("CIDEr", 0.0))


if __name__ == "__main__":
    main()

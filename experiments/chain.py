"""The FastCap chain: pretrain -> finetune -> distill (PMTD) -> quantize (PTQ) -> QAT.

    python experiments/chain.py                        # recipe chain_smoke: minutes on 2 CPU cores
    python experiments/chain.py --recipe chain_full    # the documented full recipe
    python experiments/chain.py --recipe chain_smoke logger=none   # extra overrides go to every stage

A recipe may add a `baseline` stage (the student trained without teachers at the distill
budget) so that the summary shows what distillation bought.

Each stage is a Hydra multirun of the one entry point (`python -m fastcap -m ...` or
`python -m fastcap.quantize -m ...`) into <out>/<stage>/<model>/, with
hydra.sweeper.max_batch_size=1 so a failing job stops the chain at once. A stage finds
the previous stage's checkpoint by path interpolation (`${model.name}`), so no path is
copied by hand. <out>/manifest.json records every stage's checkpoints and scores; the
chain ends with a summary table (printed, saved as summary.md, logged to W&B).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recipe(name: str, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}", *overrides])
    if "chain" not in cfg:
        sys.exit(f"experiment={name} has no 'chain:' section (teachers, student, stages)")
    return OmegaConf.to_container(cfg.chain, resolve=True)


def run_stage(name: str, module: str, args: list[str], out: Path, manifest: dict) -> None:
    cmd = [sys.executable, "-m", module, "-m", *args, f"hydra.sweep.dir={out / name}",
           "hydra.sweep.subdir=${model.name}" if module == "fastcap" else "hydra.sweep.subdir=model",
           "hydra.sweeper.max_batch_size=1"]
    print(f"\n=== chain stage {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        manifest["failed"] = name
        write_manifest(out, manifest)
        sys.exit(f"chain stopped: stage '{name}' failed (see its output above); manifest in {out / 'manifest.json'}")
    manifest["stages"][name] = {"seconds": round(time.time() - t0, 1), "dir": str(out / name)}
    write_manifest(out, manifest)


def write_manifest(out: Path, manifest: dict) -> None:
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def cpu_ms_per_image(checkpoint: Path, records, n: int = 20) -> float:
    """Median CPU latency of greedy decoding at batch 1 (after warm-up)."""
    import torch

    from fastcap.data.coco import read_image
    from fastcap.data.transforms import eval_transform
    from fastcap.model.load import load_captioner

    torch.set_flush_denormal(True)
    model, _, _ = load_captioner(checkpoint, "cpu")
    tf = eval_transform(model.cfg.encoder.image_size)
    xs = [tf(read_image(r))[None] for r in records[:n]]
    times = []
    with torch.inference_mode():
        for i, x in enumerate(xs[:3] + xs):  # the first 3 warm up
            t = time.perf_counter()
            model.greedy(x)
            if i >= 3:
                times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def summarize(out: Path, chain: dict, extra: list[str]) -> str:
    import torch

    from fastcap.data.splits import DataConfig, load_splits
    from fastcap.model.load import load_captioner
    from fastcap.train.checkpoint import load_checkpoint, saved_size

    rows = []
    entries = [("finetune", t, out / "finetune" / t) for t in chain["teachers"]]
    if (out / "baseline").is_dir():
        entries.append(("baseline (no teachers)", chain["student"], out / "baseline" / chain["student"]))
    entries += [("distill", chain["student"], out / "distill" / chain["student"]),
                ("ptq", chain["student"], out / "quantize" / "model"),
                ("qat", chain["student"], out / "qat" / chain["student"])]
    val = None
    for stage, model_name, d in entries:
        if stage == "ptq":
            ckpt = out / "quantize" / "quantized_model.pth"
            m = json.loads((d / "metrics.json").read_text())["ptq_mixed"]
        else:
            ckpt = d / "checkpoints" / "best_checkpoint.pth.tar"
            m = json.loads((d / "metrics.json").read_text())
        state = load_checkpoint(ckpt)
        model, _, _ = load_captioner(ckpt, "cpu")
        if val is None:
            val = load_splits(DataConfig.from_dict(state["config"]["data"]), ("val",), log=lambda *_: None)["val"]
        if state.get("kind") == "quantized":
            size = ckpt.stat().st_size
        else:  # the weights alone, as a deployed float32 model would ship
            size = saved_size(model.state_dict())
        params = sum(p.numel() for p in torch.nn.Module.parameters(model)) if state.get("kind") != "quantized" \
            else _params_of(state)
        rows.append([stage, model_name, f"{params / 1e6:.2f}M", f"{size / 1e6:.2f}", f"{m['CIDEr']:.3f}",
                     f"{m['Bleu_4']:.3f}", f"{cpu_ms_per_image(ckpt, val):.1f}"])
    head = ["stage", "model", "params", "size MB", "CIDEr", "BLEU-4", "CPU ms/image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    (out / "summary.md").write_text(f"# FastCap chain summary ({out.name})\n\n{table}\n\n"
                                    "CIDEr / BLEU-4: full val split, greedy (ptq: the PTQ eval subset); "
                                    "CPU ms/image: median greedy latency at batch 1, one process.\n")
    if "logger=none" not in extra:
        from fastcap.logger import LoggerConfig, build_logger

        logger = build_logger(LoggerConfig(name="wandb", group=out.name), out_dir=out, run_name="chain-summary",
                              group=out.name, job_type="summary", config=chain)
        logger.log_table("chain/summary", head, rows)
        logger.finish()
    return table


def _params_of(state: dict) -> int:
    from fastcap.model.captioner import FastCap, ModelConfig

    return FastCap(ModelConfig.from_dict(state["model_config"])).num_params()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="chain_smoke", help="an experiment config with a chain: section")
    ap.add_argument("--out", type=Path, default=None, help="chain folder (default outputs/chain/<recipe>_<time>)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every training stage")
    a = ap.parse_args()
    out = (a.out or ROOT / "outputs" / "chain" / f"{a.recipe}_{datetime.now():%Y-%m-%d_%H-%M-%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    chain = recipe(a.recipe, a.overrides)
    stage = chain.get("stages", {})
    manifest = {"recipe": a.recipe, "out": str(out), "chain": chain, "stages": {}}
    common = [f"experiment={a.recipe}", f"logger.group={out.name}", *a.overrides]
    teachers = ",".join(chain["teachers"])
    best = "checkpoints/best_checkpoint.pth.tar"

    run_stage("pretrain", "fastcap", common + ["training=pretrain", f"model={teachers}",
                                               *stage.get("pretrain", [])], out, manifest)
    run_stage("finetune", "fastcap", common + [
        "training=finetune", f"model={teachers}", f"training.resume_checkpoint={out}/pretrain/${{model.name}}/{best}",
        *stage.get("finetune", [])], out, manifest)
    teacher_paths = ",".join(f"{out}/finetune/{t}/{best}" for t in chain["teachers"])
    run_stage("distill", "fastcap", common + [
        "training=distill", f"model={chain['student']}", f"training.teachers=[{teacher_paths}]",
        *stage.get("distill", [])], out, manifest)
    if "baseline" in stage:  # the same student without teachers, for the summary's comparison
        run_stage("baseline", "fastcap", common + ["training=scratch",
                                                   f"model={chain['student']}", *stage["baseline"]], out, manifest)
    student_best = out / "distill" / chain["student"] / best
    quant_args = [a for a in a.overrides if a.startswith(("logger", "device"))]
    run_stage("quantize", "fastcap.quantize", [
        f"checkpoint={student_best}", f"output_path={out}/quantize/quantized_model.pth", *quant_args,
        *stage.get("quantize", [])], out, manifest)
    run_stage("qat", "fastcap", common + [
        "training=qat", f"model={chain['student']}", f"training.resume_checkpoint={student_best}",
        f"training.quant.report={out}/quantize/model/quant_report.json", *stage.get("qat", [])], out, manifest)

    table = summarize(out, chain, a.overrides)
    manifest["summary"] = str(out / "summary.md")
    write_manifest(out, manifest)
    print(f"\n=== FastCap chain summary ({out})\n{table}")


if __name__ == "__main__":
    main()

"""The numbers README quotes, measured with the real entry points on the built-in data.

    python experiments/evidence.py [--out outputs/evidence] [--only default,scst,finetune,quant,scale]

1. default: `python -m fastcap` exactly as the quick start runs it (wall time, val CIDEr);
2. scst:    self-critical fine-tuning from the default run's best checkpoint vs that checkpoint;
3. finetune: pretrain on synthetic_web then finetune, vs scratch with the same fine-tuning budget;
4. quant:   float vs PTQ int8 vs PTQ mixed 4/8 vs QAT mixed: CIDEr, size on disk, CPU ms/image at batch 1.
5. scale:   fastcap_tiny vs fastcap_base from scratch at the same budget (same data and steps; lr 1e-3 and 5e-4).
Each writes experiments/results/<name>.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
BEST = "checkpoints/best_checkpoint.pth.tar"


def run(module: str, args: list[str]) -> float:
    cmd = [sys.executable, "-m", module, *args]
    print("$", " ".join(cmd[2:]) if module else " ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - t


def metrics(d: Path) -> dict:
    return json.loads((d / "metrics.json").read_text())


def write(name: str, text: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def default(out: Path) -> None:
    d = out / "default"
    secs = run("fastcap", ["logger=none", f"hydra.run.dir={d}"])
    m = metrics(d)
    write("default", "# `python -m fastcap` (defaults: fastcap_tiny, built-in data (7,000 training images), 4 epochs)\n\n"
          "| wall time | best epoch | val CIDEr | BLEU-4 | METEOR | ROUGE-L |\n|---|---|---|---|---|---|\n"
          f"| {secs / 60:.1f} min | {m['epoch']} | {m['CIDEr']:.3f} | {m['Bleu_4']:.3f} | {m['METEOR']:.3f} | "
          f"{m['ROUGE_L']:.3f} |\n\nFull val split (250 images), greedy decoding, 2 CPU cores.\n")


def scst(out: Path) -> None:
    base = out / "default"
    d = out / "scst"
    run("fastcap", ["logger=none", "training=finetune", "training.objective=scst",
                    f"training.resume_checkpoint={base / BEST}", "training.num_epochs=1", "training.lr=5e-5",
                    "training.warmup_steps=10", "training.label_smoothing=0", "model.dropout=0",
                    f"hydra.run.dir={d}"])
    a, b = metrics(base), metrics(d)
    write("scst", "# Self-critical CIDEr-D optimisation (1 epoch, 5 samples/image, mean baseline)\n\n"
          "| model | val CIDEr | BLEU-4 | ROUGE-L |\n|---|---|---|---|\n"
          f"| cross-entropy (default run's best) | {a['CIDEr']:.3f} | {a['Bleu_4']:.3f} | {a['ROUGE_L']:.3f} |\n"
          f"| + SCST | {b['CIDEr']:.3f} | {b['Bleu_4']:.3f} | {b['ROUGE_L']:.3f} |\n\n"
          f"Change: {b['CIDEr'] - a['CIDEr']:+.3f} CIDEr. The reward's share of step time is in the run log.\n")


def finetune(out: Path) -> None:
    budget = ["training.num_epochs=1", "logger=none"]
    run("fastcap", ["logger=none", "training=pretrain", "training.num_epochs=1", "data.num_train=20000",
                    f"hydra.run.dir={out / 'pretrain'}"])
    run("fastcap", ["training=finetune", f"training.resume_checkpoint={out / 'pretrain' / BEST}", *budget,
                    f"hydra.run.dir={out / 'finetune'}"])
    run("fastcap", ["training=finetune", *budget, f"hydra.run.dir={out / 'scratch2'}"])
    p, f, s = metrics(out / "pretrain"), metrics(out / "finetune"), metrics(out / "scratch2")
    write("finetune", "# Pre-training + fine-tuning vs training from scratch (same fine-tuning budget)\n\n"
          "fastcap_tiny. Pre-training: 1 epoch of synthetic_web (20,000 images, one noisy alt-text caption "
          "each). Fine-tuning budget: 1 epoch of the built-in data at the finetune lr, from the pre-trained "
          "weights or from a random init.\n\n"
          "| run | val CIDEr | BLEU-4 |\n|---|---|---|\n"
          f"| pre-trained only (web val) | {p['CIDEr']:.3f} | {p['Bleu_4']:.3f} |\n"
          f"| scratch, 1 epoch | {s['CIDEr']:.3f} | {s['Bleu_4']:.3f} |\n"
          f"| pretrain + finetune, 1 epoch | {f['CIDEr']:.3f} | {f['Bleu_4']:.3f} |\n\n"
          f"Fine-tuning gain over scratch: {f['CIDEr'] - s['CIDEr']:+.3f} CIDEr.\n")


def latency_ms(ckpt: Path, n: int = 30) -> float:
    """Median CPU greedy latency at batch 1 on the checkpoint's own val images."""
    from chain import cpu_ms_per_image  # experiments/ is on sys.path when this script runs

    from fastcap.data.splits import DataConfig, load_splits
    from fastcap.train.checkpoint import load_checkpoint

    data = DataConfig.from_dict(load_checkpoint(ckpt)["config"]["data"])
    return cpu_ms_per_image(ckpt, load_splits(data, ("val",), log=lambda *_: None)["val"], n)


def quant(out: Path) -> None:
    best = out / "default" / BEST
    q = out / "quantize"
    run("fastcap.quantize", [f"checkpoint={best}", f"output_path={q / 'quantized_model.pth'}", "eval_images=0",
                             f"hydra.run.dir={q}"])
    int8 = out / "quantize_int8"
    run("fastcap.quantize", [f"checkpoint={best}", f"output_path={int8 / 'quantized_model.pth'}",
                             "quantize.bits=[8]", "quantize.avg_bits=8", "evaluate=false", f"hydra.run.dir={int8}"])
    run("fastcap", ["logger=none", "training=qat", f"training.resume_checkpoint={best}",
                    f"training.quant.report={q / 'quant_report.json'}", "training.num_epochs=1",
                    f"hydra.run.dir={out / 'qat'}"])
    run("fastcap.evaluate", [f"checkpoint={out / 'qat' / BEST}", "decode.beam_size=1", f"hydra.run.dir={out / 'qat_eval'}"])
    qm = metrics(q)
    qat = metrics(out / "qat_eval")
    import torch

    from fastcap.model.load import load_captioner
    from fastcap.train.checkpoint import saved_size

    float_mb = saved_size(load_captioner(best)[0].state_dict()) / 1e6
    rows = [("float32", qm["float"], float_mb, latency_ms(best)),
            ("PTQ int8", qm["ptq_int8"], (int8 / "quantized_model.pth").stat().st_size / 1e6,
             latency_ms(int8 / "quantized_model.pth")),
            ("PTQ mixed 4/8", qm["ptq_mixed"], (q / "quantized_model.pth").stat().st_size / 1e6,
             latency_ms(q / "quantized_model.pth")),
            ("QAT mixed 4/8", qat, (out / "qat" / BEST).stat().st_size / 1e6, latency_ms(out / "qat" / BEST))]
    fc = qm["float"]["CIDEr"]
    text = ("# Quantization of the default run's best model (fastcap_tiny)\n\n"
            f"Allocation: {sum(1 for b in qm['allocation'].values() if b == 4)} layers at 4 bits, "
            f"{sum(1 for b in qm['allocation'].values() if b == 8)} at 8 bits (budget 5.0 average bits); "
            "QAT: 1 epoch at lr 5e-5 with the same allocation.\n\n"
            "| model | val CIDEr | % of float | BLEU-4 | size MB | % of float32 | CPU ms/image (batch 1, greedy) |\n"
            "|---|---|---|---|---|---|---|\n")
    for name, m, mb, ms in rows:
        text += (f"| {name} | {m['CIDEr']:.3f} | {100 * m['CIDEr'] / fc:.1f}% | {m['Bleu_4']:.3f} | {mb:.2f} | "
                 f"{100 * mb / float_mb:.1f}% | {ms:.2f} |\n")
    text += ("\nCIDEr: full val split (250 images), greedy. Size: the file on disk (float32: the weights alone). "
             f"Latency: median of 30 images after warm-up, {torch.get_num_threads()} threads.\n")
    write("quantization", text)


SCALE_BUDGET = ["data.num_train=3000", "training.num_epochs=4"]
SCALE_LRS = ("1e-3", "5e-4")


def scale(out: Path) -> None:
    """Does model size matter on the built-in world? Same data, steps and schedule; the model and the
    peak lr (two values, since the best lr shrinks with width) differ. Finished runs are reused."""
    import torch

    from fastcap.model.load import load_captioner

    rows = []
    for name in ("fastcap_tiny", "fastcap_base"):
        for lr in SCALE_LRS:
            d = out / "scale" / f"{name}_lr{lr}"
            if not (d / "metrics.json").exists():
                run("fastcap", ["logger=none", f"model={name}", f"training.lr={lr}", *SCALE_BUDGET,
                                       f"hydra.run.dir={d}"])
            params = sum(p.numel() for p in load_captioner(d / BEST)[0].parameters())
            rows.append((name, lr, params, metrics(d)))
    best = {name: max((r for r in rows if r[0] == name), key=lambda r: r[3]["CIDEr"]) for name in
            ("fastcap_tiny", "fastcap_base")}
    text = ("# Model size at equal budget on the built-in data\n\n"
            f"All from scratch, `{' '.join(SCALE_BUDGET)}` (the built-in world at its default 64 px, "
            "250 val images), batch 32, 5 captions per image, 200 warm-up steps then cosine: the same "
            "376 optimizer steps for every run; only `model=` and `training.lr=` differ. Reduced from the "
            "default 7,000 images so that fastcap_base fits the CPU budget (~25 min a run here).\n\n"
            "| model | params (M) | peak lr | best epoch | val CIDEr | BLEU-4 | METEOR | ROUGE-L |\n"
            "|---|---|---|---|---|---|---|---|\n")
    for name, lr, params, m in rows:
        text += (f"| {name} | {params / 1e6:.2f} | {lr} | {m['epoch']} | {m['CIDEr']:.3f} | {m['Bleu_4']:.3f} | "
                 f"{m.get('METEOR', float('nan')):.3f} | {m['ROUGE_L']:.3f} |\n")
    tiny, base = best["fastcap_tiny"], best["fastcap_base"]
    text += (f"\nEach at its better lr: fastcap_base (lr {base[1]}) - fastcap_tiny (lr {tiny[1]}) = "
             f"{base[3]['CIDEr'] - tiny[3]['CIDEr']:+.3f} CIDEr (greedy, full val split, "
             f"{torch.get_num_threads()} CPU threads).\n")
    write("scale", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "evidence")
    ap.add_argument("--only", default="default,scst,finetune,quant,scale")
    a = ap.parse_args()
    steps = {"default": default, "scst": scst, "finetune": finetune, "quant": quant, "scale": scale}
    for name in a.only.split(","):
        steps[name](a.out.resolve())


if __name__ == "__main__":
    main()

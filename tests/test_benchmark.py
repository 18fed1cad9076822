"""experiments/benchmark.py --quick writes the expected markdown table (no timing assertions)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "experiments" / "benchmark.py"
HAS_HF = importlib.util.find_spec("transformers") is not None


def load_script():
    spec = importlib.util.spec_from_file_location("fastcap_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod


def table_rows(text: str) -> dict[str, list[str]]:
    """First markdown table: {row name: cells}, plus '__header__'."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {"__header__": header}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(header):
            break  # the next table
        rows[cells[0]] = cells
    return rows


def test_quick_benchmark_writes_the_table(tmp_path):
    out = tmp_path / "bench.md"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert text in r.stdout  # printed and saved
    rows = table_rows(text)
    assert rows["__header__"] == ["model", "params (M)", "GFLOPs/caption", "checkpoint MB", "greedy b1 ms/img",
                                  "beam3 b1 ms/img", "greedy b8 img/s", "train b8 img/s",
                                  "% of matmul peak (b8)"]
    for name in ("FastCap tiny", "FastCap tiny int8", "FastCap tiny mixed 4/8"):
        assert name in rows, f"missing row {name}"
    for cell in rows["FastCap tiny"][1:]:
        float(cell.replace(",", ""))  # every float-model cell is measured
    assert "matmul peak" in text and "GFLOP/s" in text and "**cpu**" in text
    assert "other jobs may have been running" in text
    if HAS_HF:
        assert "HF ViT+GPT-2 (~tiny)" in rows
        assert "| tiny |" in text and "greedy b1 speedup" in text
    else:
        assert "transformers is not installed" in text


def test_without_transformers_the_hf_rows_are_skipped_with_a_note(monkeypatch):
    bench = load_script()
    monkeypatch.setitem(sys.modules, "transformers", None)
    note = bench.hf_available()
    assert note and "pip install transformers" in note
    import torch

    s = bench.Settings(["tiny"], [], [], batch=8, repeats_b1=1, repeats_batch=1, warmup=0, peak_repeats=1,
                       device=torch.device("cpu"), threads=1)
    text = bench.render([bench.Row("FastCap tiny", params=1.0)], s, 10.0, note, (0.0, 0.0), True, 1.0)
    assert "HF " not in text.split("## ")[0]
    assert f"Skipped: {note}" in text


@pytest.mark.skipif(importlib.util.find_spec("fastcap.quant") is None, reason="fastcap.quant not present")
def test_mixed_allocation_averages_at_most_5_bits():
    bench = load_script()
    import torch

    model = bench.build_fastcap("tiny", torch.device("cpu"))
    alloc, avg = bench.mixed_allocation(model)
    assert avg <= 5 and set(alloc.values()) <= {4, 8}
    assert all(b == 4 for n, b in alloc.items() if n.endswith(("mlp.fc", "mlp.out")))

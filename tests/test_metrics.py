"""Tests for fastcap.eval.metrics (official COCO caption metrics via pycocoevalcap)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pycocoevalcap")

from fastcap.eval import metrics  # noqa: E402
from fastcap.eval.metrics import (  # noqa: E402
    CaptionScorer,
    EvaluationError,
    format_table,
    python_ptb_tokenize,
    score_results_file,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
DEMO = FIXTURES / "coco-caption-example"
COCO_MINI = FIXTURES / "coco-mini"
HAVE_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAVE_JAVA, reason="needs Java (METEOR and the PTB tokenizer are Java programs)")

REFS = {
    1: ["A man riding a horse on a beach.", "A person rides a brown horse near the ocean."],
    2: ["Two cats sleeping on a red couch.", "A pair of cats asleep on a sofa."],
    3: ["A plate of food with broccoli and rice.", "Rice and broccoli served on a white plate."],
}
CANDS = {1: "a man riding a horse on the beach", 2: "two cats on a couch", 3: "a plate of pizza"}


def _no_java(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "java" else real_which(cmd, *a, **k))
    # Also empty PATH so that an accidental Java launch would fail instead of passing.
    monkeypatch.setenv("PATH", "")


@needs_java
def test_official_demo_scores() -> None:
    if not DEMO.is_dir():
        pytest.skip(f"official demo fixture not found at {DEMO}")
    scores = score_results_file(
        DEMO / "captions_val2014_fakecap_results.json",
        DEMO / "captions_val2014_fakecap_gt_tokenized_coco_format.json",
    )
    expected = {
        "Bleu_1": 0.579, "Bleu_2": 0.404, "Bleu_3": 0.279, "Bleu_4": 0.191,
        "METEOR": 0.195, "ROUGE_L": 0.396, "CIDEr": 0.600,
    }
    assert {k: round(v, 3) for k, v in scores.items()} == expected


@needs_java
def test_meteor_process_reused_and_closed() -> None:
    with CaptionScorer() as scorer:
        first, per_image = scorer.score(REFS, CANDS)
        proc = scorer._meteor_proc.meteor.meteor_p
        second, _ = scorer.score(REFS, {1: CANDS[1], 2: CANDS[2]})
        assert scorer._meteor_proc.meteor.meteor_p is proc  # same JVM, not a new one
        assert proc.poll() is None
    assert proc.poll() is not None  # closed on leaving the with block
    assert set(first) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert set(per_image) == set(CANDS)
    assert sum(per_image.values()) / len(per_image) == pytest.approx(first["CIDEr"])
    assert per_image[1] > per_image[3]
    assert 0 < second["METEOR"] <= 1
    with pytest.raises(EvaluationError, match="closed"):
        scorer.score(REFS, CANDS)


@needs_java
def test_meteor_stopped_at_interpreter_exit() -> None:
    code = (
        "from fastcap.eval.metrics import CaptionScorer\n"
        "s = CaptionScorer()\n"
        "print(s._meteor_proc.meteor.meteor_p.pid)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.strip().splitlines()[-1])
    noise = [l for l in out.stderr.splitlines() if l.strip() and not l.startswith("PTBTokenizer tokenized")]
    assert noise == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_no_java_meteor_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_java(monkeypatch)
    with pytest.raises(EvaluationError, match=r"Java.*METEOR.*eval\.meteor=false"):
        CaptionScorer(meteor=True)


def test_no_java_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_java(monkeypatch)
    messages: list[str] = []
    with CaptionScorer(meteor=False, log=messages.append) as scorer:
        scores, per_image = scorer.score(REFS, CANDS)
        scorer.score(REFS, CANDS)
    assert len(messages) == 1 and "may differ slightly" in messages[0]
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert per_image[1] > per_image[3]


@needs_java
def test_python_tokenizer_matches_ptb() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = [c for v in REFS.values() for c in v] + [
        "A man's hat (red), isn't \"it\"?", "black-and-white photo of 3.5 dogs & cats...",
        "Hello.World; U.S. e-mail 10:30 a/b $5 50% don't cannot gonna",
        "The dogs' toys -- all 1,000 of them!", "Mr. Smith met Dr. Who at St. Paul.",
        "A sign: \"No parking\" [here] {there}", "a cat,a dog", "They're we've I'll he'd I'm",
    ]
    for name in ("captions_train2017.json", "captions_val2017.json"):
        if (COCO_MINI / name).is_file():
            captions += [a["caption"] for a in json.loads((COCO_MINI / name).read_text())["annotations"]]
    official = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    mismatches = [(c, official[i][0], python_ptb_tokenize(c)) for i, c in enumerate(captions)
                  if official[i][0] != python_ptb_tokenize(c)]
    assert mismatches == []


def test_spice_missing_jars_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pycocoevalcap.spice import get_stanford_models as gsm

    monkeypatch.setattr(gsm, "SPICEDIR", str(tmp_path))  # an empty folder: jars absent

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("SPICE must not try to download CoreNLP")

    monkeypatch.setattr(gsm, "urlretrieve", no_download)
    if not HAVE_JAVA:
        _no_java(monkeypatch)
    messages: list[str] = []
    with CaptionScorer(meteor=False, spice=True, log=messages.append) as scorer:
        scores, _ = scorer.score(REFS, CANDS)
    spice_msgs = [m for m in messages if "SPICE" in m]
    assert len(spice_msgs) == 1
    if HAVE_JAVA:
        msg = spice_msgs[0]
        assert "stanford-corenlp-3.6.0.jar" in msg and "stanford-corenlp-3.6.0-models.jar" in msg
        assert str(tmp_path / "lib") in msg
        assert "stanford-corenlp-full-2015-12-09.zip" in msg
    assert "SPICE" not in scores and "CIDEr" in scores


def test_input_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_java(monkeypatch)  # validation happens before any tokenizing; keep it fast
    with CaptionScorer(meteor=False, log=lambda m: None) as scorer:
        with pytest.raises(EvaluationError, match="No candidate"):
            scorer.score(REFS, {})
        with pytest.raises(EvaluationError, match="No reference captions.*99"):
            scorer.score(REFS, {1: "a horse", 99: "a cat"})
        with pytest.raises(EvaluationError, match="non-empty list"):
            scorer.score({1: []}, {1: "a horse"})


def _write(path: Path, content: object | str) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_bad_results_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_java(monkeypatch)
    ann = _write(tmp_path / "ann.json", {"annotations": [{"image_id": 1, "caption": "a horse", "id": 1}]})
    good = _write(tmp_path / "res.json", [{"image_id": 1, "caption": "a horse"}])
    cases = [
        (tmp_path / "missing.json", ann, "Results file not found"),
        (_write(tmp_path / "bad.json", "[{oops"), ann, "not valid JSON"),
        (_write(tmp_path / "dict.json", {"image_id": 1}), ann, "expected a JSON list"),
        (_write(tmp_path / "nocap.json", [{"image_id": 1}]), ann, "entry 0"),
        (_write(tmp_path / "dup.json", [{"image_id": 1, "caption": "a"}] * 2), ann, "more than once"),
        (_write(tmp_path / "other.json", [{"image_id": 7, "caption": "a"}]), ann, "without captions"),
        (_write(tmp_path / "empty.json", []), ann, "empty"),
        (good, tmp_path / "nope.json", "Annotations file not found"),
        (good, _write(tmp_path / "list_ann.json", []), "COCO captions annotation file"),
    ]
    for res, annotations, message in cases:
        with pytest.raises(EvaluationError, match=message) as info:
            score_results_file(res, annotations, meteor=False, log=lambda m: None)
        assert len(str(info.value)) < 300
    scores = score_results_file(good, ann, meteor=False, log=lambda m: None)
    assert scores["Bleu_1"] == pytest.approx(1.0)


def test_format_table() -> None:
    table = format_table({"CIDEr": 0.6, "Bleu_1": 0.5794, "METEOR": 0.19525})
    lines = table.splitlines()
    assert lines[2].split() == ["Bleu_1", "0.579"]
    assert lines[-1].split() == ["CIDEr", "0.600"]
    column = lines[0].index("Score")
    assert all(l[column - 2 : column] == "  " and l[column] != " " for l in lines)  # aligned


def test_no_hydra_import() -> None:
    code = "import sys, fastcap.eval.metrics, fastcap.eval.cider, fastcap.eval.gallery; print('hydra' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr

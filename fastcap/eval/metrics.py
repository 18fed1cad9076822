"""Official COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE) via pycocoevalcap.

The scorers of pycocoevalcap are driven directly instead of through ``COCOEvalCap``:
that class needs pycocotools objects, restarts the METEOR JVM on every evaluation and
lets SPICE download CoreNLP (which fails offline). The data flow is kept identical to
``COCOEvalCap.evaluate()`` so that scores match the published toolkit.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import weakref
from pathlib import Path
from typing import Any, Callable


__all__ = [
    "CaptionScorer",
    "EvaluationError",
    "format_table",
    "python_ptb_tokenize",
    "score_results_file",
]

METRIC_ORDER = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")

# Same list as pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS; duplicated so the
# pure-Python tokenizer works without importing anything Java-related.
_PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


class EvaluationError(Exception):
    """A problem with the evaluation inputs or environment, phrased for the user."""


# --------------------------------------------------------------------------------------
# Pure-Python stand-in for the Stanford PTB tokenizer (used only when Java is missing)
# --------------------------------------------------------------------------------------

_CHAR_MAP = str.maketrans({
    "\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2026": "...",
    "\u00a0": " ", "\u2013": "--", "\u2014": "--",
})
# PTB renders brackets as escape tokens; after -lowerCase they no longer match the
# upper-case entries of PUNCTUATIONS, so the official pipeline keeps them (e.g. "-lrb-").
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPECIAL_SPLITS = {
    "cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
    "wanna": ["wan", "na"], "lemme": ["lem", "me"], "gimme": ["gim", "me"],
}
_ABBREVIATIONS = frozenset(
    "mr. mrs. ms. dr. st. jr. sr. vs. etc. inc. co. ltd. corp. mt. ft. no. approx. ave. "
    "jan. feb. mar. apr. jun. jul. aug. sep. sept. oct. nov. dec.".split()
)
_ACRONYM = re.compile(r"^(?:[a-z]\.)+[a-z]?\.?$")
_NT = re.compile(r"^(.+)(n't)$")
_CLITIC = re.compile(r"^(.+?)('s|'re|'ve|'ll|'d|'m)$")
_SPLIT_CHARS = re.compile(r"([()\[\]{}\"`!?;]|\.\.\.+|--+)")
# Commas and colons separate tokens unless they sit inside a number ("1,000", "10:30").
_INNER_SEP = re.compile(r"(?<!\d)([,:])|([,:])(?!\d)")


def _split_word(word: str) -> list[str]:
    lead: list[str] = []
    trail: list[str] = []
    while word and word[0] in "'$#-":
        lead.append(word[0])
        word = word[1:]
    while word:
        if word[-1] in "'%-":
            trail.insert(0, word[-1])
            word = word[:-1]
        elif word[-1] == "." and not (word in _ABBREVIATIONS or _ACRONYM.match(word)):
            trail.insert(0, ".")
            word = word[:-1]
        else:
            break
    core: list[str] = []
    if word in _SPECIAL_SPLITS:
        core = list(_SPECIAL_SPLITS[word])
    elif word:
        m = _NT.match(word) or _CLITIC.match(word)
        core = [m.group(1), m.group(2)] if m else [word]
    return lead + core + trail


def python_ptb_tokenize(caption: str) -> str:
    """Approximate ``PTBTokenizer`` output (lower-cased, punctuation tokens removed).

    Used only when Java is unavailable; ordinary captions tokenize identically, rare
    constructs (unusual abbreviations, exotic unicode) can differ slightly.
    """
    text = caption.translate(_CHAR_MAP).lower()
    tokens: list[str] = []
    for chunk in text.split():
        for piece in _SPLIT_CHARS.split(chunk):
            if not piece:
                continue
            if piece in _BRACKETS:
                tokens.append(_BRACKETS[piece])
                continue
            if _SPLIT_CHARS.fullmatch(piece):
                tokens.append(piece)
                continue
            for part in _INNER_SEP.split(piece):
                if part:
                    tokens.extend(_split_word(part))
    return " ".join(t for t in tokens if t and t not in _PTB_PUNCTUATIONS and t != '"')


# --------------------------------------------------------------------------------------
# Java helpers
# --------------------------------------------------------------------------------------


def _java_available() -> bool:
    return shutil.which("java") is not None


def _spice_jar_status() -> tuple[Path, list[str], str]:
    """(lib folder, missing jar names, download URL) for SPICE's Stanford CoreNLP jars."""
    from pycocoevalcap.spice import get_stanford_models as gsm

    lib = Path(gsm.SPICEDIR).resolve() / gsm.SPICELIB
    # spice-1.0.jar's manifest Class-Path lists both; get_stanford_models extracts both.
    names = [f"{gsm.JAR}.jar", f"{gsm.JAR}-models.jar"]
    missing = [n for n in names if not (lib / n).is_file()]
    url = f"http://nlp.stanford.edu/software/{gsm.CORENLP}.zip"
    return lib, missing, url


class _MeteorProcess:
    """Owns the METEOR JVM so that a finalizer can stop it without referencing the scorer."""

    def __init__(self) -> None:
        self.meteor: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self.meteor is None:
                from pycocoevalcap.meteor.meteor import Meteor

                try:
                    self.meteor = Meteor()
                except OSError as exc:
                    raise EvaluationError(f"Could not start the Java METEOR scorer: {exc}") from exc
            return self.meteor

    def shutdown(self) -> None:
        with self._lock:
            meteor, self.meteor = self.meteor, None
        if meteor is None:
            return
        proc = meteor.meteor_p
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except Exception:
                pass
        try:
            proc.kill()
            proc.wait(timeout=10)
        except Exception:
            pass
        # Meteor.compute_score never releases its lock when it raises, and Meteor.__del__
        # acquires it: without this release garbage collection (or exit) would hang.
        try:
            if meteor.lock.locked():
                meteor.lock.release()
        except Exception:
            pass


# --------------------------------------------------------------------------------------
# Scorer
# --------------------------------------------------------------------------------------


class CaptionScorer:
    """Computes the COCO caption metrics; reuse one instance across evaluations.

    The METEOR JVM is started here, once, and reused by every ``score()`` call; it
    spends ~15 s loading its paraphrase tables, which then overlaps with training
    instead of delaying the first validation. ``close()`` (or leaving the ``with``
    block, or interpreter exit) stops it.
    """

    def __init__(
        self,
        *,
        meteor: bool = True,
        spice: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        self._log = log
        self._use_meteor = meteor
        self._java = _java_available()
        self._closed = False
        if not self._java and meteor:
            raise EvaluationError(
                "Java is needed for METEOR and the official PTB tokenizer, but `java` was not "
                "found on PATH. Install a Java runtime (JRE 8+) or set `eval.meteor=false`."
            )
        if not self._java:
            self._log(
                "Java not found: captions are tokenized with a pure-Python PTB tokenizer; "
                "scores may differ slightly from the official COCO caption toolkit."
            )
        self._use_spice = spice and self._spice_usable()
        self._meteor_proc = _MeteorProcess()
        self._finalizer = weakref.finalize(self, self._meteor_proc.shutdown)
        if meteor:
            self._meteor_proc.get()

    def _spice_usable(self) -> bool:
        if not self._java:
            self._log("SPICE skipped: it needs Java, which was not found on PATH.")
            return False
        lib, missing, url = _spice_jar_status()
        if missing:
            self._log(
                "SPICE skipped: Stanford CoreNLP jars missing ("
                + ", ".join(missing)
                + f"). Put them in {lib}/ (they are in {url}, folder "
                + f"{Path(url).stem}/). Other metrics are computed as usual."
            )
            return False
        return True

    # -- context manager / lifecycle ----------------------------------------------------

    def __enter__(self) -> "CaptionScorer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the Java METEOR subprocess (idempotent)."""
        self._closed = True
        self._finalizer()

    # -- scoring -----------------------------------------------------------------------

    def _tokenize(self, captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
        if not self._java:
            return {k: [python_ptb_tokenize(c) for c in v] for k, v in captions.items()}
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        # PTBTokenizer pairs output lines with inputs by position, so any line break
        # inside a caption (it only replaces "\n") would shift every later caption.
        # Collapsing whitespace does not change PTB's tokens.
        data = {k: [{"caption": " ".join(c.split())} for c in v] for k, v in captions.items()}
        try:
            out = PTBTokenizer().tokenize(data)
        except OSError as exc:
            raise EvaluationError(f"The Java PTB tokenizer failed to run: {exc}") from exc
        if any(len(out.get(k, [])) != len(v) for k, v in captions.items()):
            raise EvaluationError("The Java PTB tokenizer returned a different number of captions than given.")
        return out

    def score(
        self, references: dict[int, list[str]], candidates: dict[int, str]
    ) -> tuple[dict[str, float], dict[int, float]]:
        """Score one caption per image against that image's references.

        Returns corpus-level scores keyed by the pycocoevalcap names and the
        per-image CIDEr of every candidate.
        """
        if self._closed:
            raise EvaluationError("This CaptionScorer has been closed; create a new one.")
        _validate_inputs(references, candidates)
        ids = list(candidates)
        gts = self._tokenize({i: list(references[i]) for i in ids})
        res = self._tokenize({i: [candidates[i]] for i in ids})

        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        scores: dict[str, float] = {}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for n, value in enumerate(bleu, start=1):
            scores[f"Bleu_{n}"] = float(value)
        if self._use_meteor:
            meteor = self._meteor_proc.get()
            try:
                value, _ = meteor.compute_score(gts, res)
            except Exception as exc:
                # The JVM's state is unknown after a failure: restart it next time.
                self._meteor_proc.shutdown()
                raise EvaluationError(f"The Java METEOR scorer failed: {exc!r}") from exc
            scores["METEOR"] = float(value)
        value, _ = Rouge().compute_score(gts, res)
        scores["ROUGE_L"] = float(value)
        value, per_image = Cider().compute_score(gts, res)
        scores["CIDEr"] = float(value)
        per_image_cider = {i: float(s) for i, s in zip(gts.keys(), per_image)}
        if self._use_spice:
            spice_value = self._run_spice(gts, res)
            if spice_value is not None:
                scores["SPICE"] = spice_value
        return scores, per_image_cider

    def _run_spice(self, gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float | None:
        from pycocoevalcap.spice.spice import Spice

        # Re-checked because the jars could have been removed since __init__, and
        # Spice() would then start a download.
        lib, missing, _ = _spice_jar_status()
        if missing:
            self._log(f"SPICE skipped: {', '.join(missing)} no longer in {lib}/.")
            self._use_spice = False
            return None
        try:
            value, _ = Spice().compute_score(gts, res)
        except Exception as exc:
            self._log(f"SPICE failed and was skipped: {exc!r}")
            return None
        return float(value)


def _validate_inputs(references: dict[Any, list[str]], candidates: dict[Any, str]) -> None:
    if not candidates:
        raise EvaluationError("No candidate captions to evaluate.")
    missing = [i for i in candidates if i not in references]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise EvaluationError(f"No reference captions for {len(missing)} candidate image id(s): {shown}")
    for i, cand in candidates.items():
        if not isinstance(cand, str):
            raise EvaluationError(f"Candidate for image {i} must be a string, got {type(cand).__name__}.")
        refs = references[i]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise EvaluationError(f"References for image {i} must be a non-empty list of strings.")


# --------------------------------------------------------------------------------------
# Files and printing
# --------------------------------------------------------------------------------------


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise EvaluationError(f"{what} file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"{what} file {path} is not valid JSON: {exc}") from exc


def _results_from_json(data: Any, path: Path) -> dict[int, str]:
    expected = 'a JSON list of {"image_id": int, "caption": str} (COCO results format)'
    if not isinstance(data, list):
        raise EvaluationError(f"Results file {path}: expected {expected}, got a JSON {type(data).__name__}.")
    candidates: dict[int, str] = {}
    for k, item in enumerate(data):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("image_id"), int)
            and isinstance(item.get("caption"), str)
        ):
            raise EvaluationError(
                f'Results file {path}: entry {k} is not {{"image_id": int, "caption": str}}: {str(item)[:80]}'
            )
        if item["image_id"] in candidates:
            raise EvaluationError(
                f"Results file {path}: image_id {item['image_id']} appears more than once; "
                "give one caption per image."
            )
        candidates[item["image_id"]] = item["caption"]
    if not candidates:
        raise EvaluationError(f"Results file {path} is empty; expected {expected}.")
    return candidates


def _references_from_json(data: Any, path: Path) -> dict[int, list[str]]:
    expected = 'a COCO captions annotation file: {"annotations": [{"image_id": int, "caption": str}, ...]}'
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise EvaluationError(f"Annotations file {path}: expected {expected}.")
    references: dict[int, list[str]] = {}
    for k, ann in enumerate(anns):
        if not (isinstance(ann, dict) and isinstance(ann.get("image_id"), int) and isinstance(ann.get("caption"), str)):
            raise EvaluationError(f"Annotations file {path}: annotation {k} lacks an integer image_id and a caption string.")
        references.setdefault(ann["image_id"], []).append(ann["caption"])
    return references


def score_results_file(
    results_json: str | Path, annotations_json: str | Path, **scorer_kwargs: Any
) -> dict[str, float]:
    """Score a COCO results file against COCO caption annotations, like COCOEvalCap.

    Only the image ids present in the results are scored (COCOEvalCap with
    ``params['image_id'] = cocoRes.getImgIds()``).
    """
    results_path, ann_path = Path(results_json), Path(annotations_json)
    candidates = _results_from_json(_load_json(results_path, "Results"), results_path)
    references = _references_from_json(_load_json(ann_path, "Annotations"), ann_path)
    unknown = [i for i in candidates if i not in references]
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise EvaluationError(
            f"Results file {results_path} has {len(unknown)} image id(s) without captions in "
            f"{ann_path}: {shown}"
        )
    with CaptionScorer(**scorer_kwargs) as scorer:
        scores, _ = scorer.score(references, candidates)
    return scores


def format_table(scores: dict[str, float]) -> str:
    """A two-column text table, metrics in the usual COCO order."""
    names = [m for m in METRIC_ORDER if m in scores] + [m for m in scores if m not in METRIC_ORDER]
    width = max([len("Metric")] + [len(n) for n in names])
    lines = [f"{'Metric':<{width}}  Score", f"{'-' * width}  -----"]
    lines += [f"{n:<{width}}  {scores[n]:.3f}" for n in names]
    return "\n".join(lines)

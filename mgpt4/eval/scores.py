"""COCO caption metrics with the field's standard implementation, pycocoevalcap (the COCO caption
evaluation code): BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D's CIDEr, on captions lowercased and
tokenized by the Stanford PTB tokenizer with punctuation removed, as `COCOEvalCap.evaluate` does.

SPICE is left out: it downloads Stanford CoreNLP models at run time. METEOR and the PTB tokenizer are
Java programs shipped inside the package, so scoring needs a Java runtime (`java` on PATH) and no
network. Scores are on pycocoevalcap's scale: 0-1 for all but CIDEr (0-10).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
_SPACE = re.compile(r"\s+")


class ScoringError(RuntimeError):
    """The scorer cannot run here (no Java, pycocoevalcap missing or not writable); says what to install."""


def _one_line(text: str) -> str:
    # The PTB tokenizer reads one caption per line: a \r or other line break inside a caption would
    # shift every caption after it onto the wrong image.
    return _SPACE.sub(" ", text).strip()


def _tokenize(tokenizer, captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    out = tokenizer.tokenize({k: [{"caption": _one_line(c)} for c in caps] for k, caps in captions.items()})
    bad = [k for k, caps in captions.items() if len(out.get(k, ())) != len(caps)]
    if bad:
        raise ScoringError(f"the PTB tokenizer lost captions of {len(bad)} image(s), e.g. {bad[0]!r}")
    return out


def score_captions(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Corpus scores of one predicted caption per image against its reference captions.

    `predictions` and `references` are keyed by image and must have the same keys; every image needs
    at least one reference. An empty prediction is scored as it is (it matches nothing). Returns
    {metric: score} for `METRICS`. Raises ValueError for mismatched inputs and ScoringError when the
    scorer cannot run.
    """
    if set(predictions) != set(references):
        only_p = sorted(set(predictions) - set(references))[:5]
        only_r = sorted(set(references) - set(predictions))[:5]
        raise ValueError(
            f"predictions and references differ: only predicted {only_p}, only referenced {only_r}"
        )
    if not predictions:
        raise ValueError("no captions to score")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"image {empty[0]!r} has no reference caption")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as e:
        raise ScoringError(f"caption metrics need pycocoevalcap: pip install -e '.[eval]' ({e})") from None
    if shutil.which("java") is None:
        raise ScoringError(
            "METEOR and the PTB tokenizer of pycocoevalcap run on Java, and no `java` is on PATH; install a "
            "runtime (Debian/Ubuntu: apt-get install default-jre-headless)"
        )
    keys = sorted(predictions)
    tokenizer = PTBTokenizer()
    try:
        gts = _tokenize(tokenizer, {k: list(references[k]) for k in keys})
        res = _tokenize(tokenizer, {k: [predictions[k]] for k in keys})
    except OSError as e:
        where = os.path.dirname(sys.modules[PTBTokenizer.__module__].__file__ or "")
        raise ScoringError(
            f"pycocoevalcap's PTB tokenizer writes a temporary file into {where} and runs java there: {e}"
        ) from e
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        del meteor  # ends its java process
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    values = [*bleu, meteor_score, rouge, cider]
    return {name: float(v) for name, v in zip(METRICS, values)}


def format_table(scores: Mapping[str, float], images: int) -> str:
    """The scores as a two-column text table, in `METRICS` order."""
    width = max(len(m) for m in METRICS)
    lines = [f"{'metric':<{width}}  score", f"{'-' * width}  ------"]
    lines += [f"{m:<{width}}  {scores[m]:.4f}" for m in METRICS if m in scores]
    lines.append(f"({images} images)")
    return "\n".join(lines)

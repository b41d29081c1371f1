"""Step 3, filter: the paper's rules drop bad captions; the rest becomes a cc_sbu_align folder.

    <out>/filter_cap.json     {"annotations": [{"image_id": "2", "caption": "..."}, ...]}
    <out>/image/{id}.jpg      hard links (or copies) of JPEG sources; other formats re-encoded
    <out>/rejects.jsonl       one line per dropped item: id, rule, reason, text, source
    <out>/filter_report.json  the per-rule counts that are also printed

Every item that ever entered describe is accounted for: kept, dropped by a rule, failed in an
earlier step (`describe_failed`, `fix_failed`), never processed by a later one (`fix_pending`),
`image_unreadable` or `bad_record` (a done record without text, or an id that is no file name).
The rules are cheap and re-run in full; images already in image/ are not written again.
Keeping no pair at all is an error (exit status 1): the folder is still written, rejects included,
but there is nothing to train on.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from mgpt4.curate.images import write_jpeg
from mgpt4.curate.rules import RULE_ORDER, RulesConfig, first_rule, normalise, validate_rules
from mgpt4.curate.store import DONE, StoreError, read_meta, read_store, upstream_chain, write_json_atomic
from mgpt4.image_sources import ImageItem, safe_id

ANNOTATIONS_FILE = "filter_cap.json"
IMAGE_DIR = "image"
REJECTS_FILE = "rejects.jsonl"
REPORT_FILE = "filter_report.json"
IMAGE_RULE = "image_unreadable"
BAD_RECORD = "bad_record"


@dataclass
class FilterConfig:
    """What filter does; each field but `rules` is a flag of `python -m mgpt4.curate filter`."""

    # A fix store (or a describe store, to skip fixing).
    input: str = field(metadata={"help": "fix's store folder (or describe's, to skip fixing)"})
    out: str = field(metadata={"help": "the cc_sbu_align folder to write"})
    rules: RulesConfig = field(
        default_factory=RulesConfig, metadata={"derived": "--rules FILE, then --set and --disable"}
    )
    rejects: str | None = field(
        default=None, metadata={"help": "rejects file (default: <out>/rejects.jsonl)"}
    )
    # Hard-link JPEG sources into image/ when on the same file system (no extra space).
    link: bool = field(
        default=True, metadata={"flag": "--copy", "help": "copy images instead of hard-linking them"}
    )
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

    def rejects_path(self) -> str:
        return self.rejects or os.path.join(self.out, REJECTS_FILE)


@dataclass
class FilterReport:
    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    annotations: str = ""
    rejects: str = ""

    def table(self, rules: RulesConfig) -> str:
        rows = [("rule", "on", "dropped")]
        upstream = [k for k in self.dropped if k not in RULE_ORDER and k != IMAGE_RULE]
        for name in sorted(upstream):
            rows.append((name, "-", str(self.dropped[name])))
        for name in RULE_ORDER:
            rows.append(
                (name, "yes" if getattr(rules, name).enabled else "no", str(self.dropped.get(name, 0)))
            )
        rows.append((IMAGE_RULE, "-", str(self.dropped.get(IMAGE_RULE, 0))))
        rows.append(("kept", "", str(self.kept)))
        rows.append(("total", "", str(self.total)))
        w0 = max(len(r[0]) for r in rows)
        lines = [f"{a:<{w0}}  {b:>3}  {c:>7}" for a, b, c in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 2, "-" * len(lines[0]))
        return "\n".join(lines)


def _reject(rec: dict[str, Any], rule: str, reason: str, text: str | None = None) -> dict[str, Any]:
    return {
        "id": rec["id"],
        "rule": rule,
        "reason": reason,
        "text": text if text is not None else rec.get("text"),
        "source": rec.get("source"),
    }


def collect(cfg: FilterConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept records with normalised "caption", rejects) over the input store and its upstream."""
    meta = read_meta(cfg.input)
    if meta is None:
        raise StoreError(f"--input {cfg.input}: not an mgpt4 curate store (no meta.json); give fix's --out")
    state = read_store(cfg.input)
    kept: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for item_id in sorted(state.records):
        rec = state.records[item_id]
        if rec["status"] != DONE:
            rejects.append(_reject(rec, f"{meta['step']}_failed", str(rec.get("error"))))
            continue
        if not isinstance(rec.get("text"), str):
            rejects.append(_reject(rec, BAD_RECORD, "done but has no text"))
            continue
        if safe_id(item_id) != item_id:
            rejects.append(_reject(rec, BAD_RECORD, f"id cannot be a file name in {IMAGE_DIR}/"))
            continue
        text = normalise(rec["text"])
        hit = first_rule(cfg.rules, text)
        if hit is not None:
            rejects.append(_reject(rec, hit[0], hit[1], text))
        else:
            kept.append({**rec, "caption": text})
    # Items that stopped in an earlier step never reach this store: count them too.
    seen = set(state.records)
    chain = upstream_chain(cfg.input)
    for (down_step, _), (step, root) in itertools.pairwise(chain):
        for item_id, rec in sorted(read_store(root).records.items()):
            if item_id in seen:
                continue
            seen.add(item_id)
            if rec["status"] == DONE:
                rejects.append(
                    _reject(rec, f"{down_step}_pending", f"done in {step} but not yet in {down_step}")
                )
            else:
                rejects.append(_reject(rec, f"{step}_failed", str(rec.get("error"))))
    return kept, rejects


def run_filter(cfg: FilterConfig) -> FilterReport:
    validate_rules(cfg.rules)
    if read_meta(cfg.out) is not None:
        raise StoreError(f"--out {cfg.out}: this is a curate store; give filter a folder of its own")
    kept, rejects = collect(cfg)
    image_dir = os.path.join(cfg.out, IMAGE_DIR)
    os.makedirs(image_dir, exist_ok=True)
    annotations = []
    for rec in tqdm(kept, desc="filter images", unit="img", disable=not cfg.progress):
        dst = os.path.join(image_dir, f"{rec['id']}.jpg")
        if not os.path.isfile(dst):  # written atomically, so present means complete
            try:
                item = ImageItem.from_record(rec)
                write_jpeg(item.read_bytes(), dst, item.path if cfg.link and item.member is None else None)
            except Exception as e:  # this item's image, not the run
                rejects.append(_reject(rec, IMAGE_RULE, f"{type(e).__name__}: {e}", rec["caption"]))
                continue
        annotations.append({"image_id": rec["id"], "caption": rec["caption"]})

    report = FilterReport(kept=len(annotations))
    for r in rejects:
        report.dropped[r["rule"]] = report.dropped.get(r["rule"], 0) + 1
    report.total = report.kept + len(rejects)
    report.annotations = os.path.join(cfg.out, ANNOTATIONS_FILE)
    report.rejects = cfg.rejects_path()
    write_json_atomic(report.annotations, {"annotations": annotations})
    _write_jsonl_atomic(report.rejects, sorted(rejects, key=lambda r: r["id"]))
    write_json_atomic(
        os.path.join(cfg.out, REPORT_FILE),
        {
            "total": report.total,
            "kept": report.kept,
            "dropped": report.dropped,
            "input": os.path.abspath(cfg.input),
        },
    )
    names = {a["image_id"] + ".jpg" for a in annotations}
    stale = [n for n in os.listdir(image_dir) if n.endswith(".jpg") and n not in names]
    print(report.table(cfg.rules), file=sys.stderr)
    print(f"wrote {report.annotations} ({report.kept} pairs) and {report.rejects}", file=sys.stderr)
    if stale:
        print(
            f"note: {len(stale)} image(s) in {image_dir} are not in {ANNOTATIONS_FILE} (from an earlier run)",
            file=sys.stderr,
        )
    if not annotations:
        # Nothing to train on: an error, so that a pipeline stops here and not at training's start.
        raise EmptyResult(
            f"filter kept 0 pairs of {report.total} item(s): {report.annotations} holds no pairs, so "
            f"stage 2 cannot train on it; every item is in {report.rejects} with the rule that dropped it "
            "(loosen a rule with --set or --disable, or check the earlier steps)"
        )
    return report


class EmptyResult(StoreError):
    """`filter` kept no pair: the folder is written (with its rejects), but there is nothing to train on."""


def _write_jsonl_atomic(path: str, rows: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

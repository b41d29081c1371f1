"""filter: each rule on its own cases, and the cc_sbu_align folder with every item accounted for."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from mgpt4.curate.__main__ import main
from mgpt4.curate.filter import FilterConfig, run_filter
from mgpt4.curate.rules import RulesConfig, check_repetition, first_rule, normalise
from mgpt4.curate.store import DONE, FAILED, PartWriter, open_store, record
from tests.curate_fixtures import draw_images

GOOD = (
    "The image shows a small brown dog sitting on a green lawn in front of a white house. The dog is "
    "looking at the camera with its ears raised, and a red ball lies next to its front paws. In the "
    "background there are tall trees and a clear blue sky."
)


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("I'm sorry, but I cannot see the image you are talking about. " + GOOD, "refusal"),
        ("I apologize for the confusion. " + GOOD, "refusal"),
        ("As an AI language model I do not have eyes, but " + GOOD, "refusal"),
        ("I am unable to provide a description of this picture. " + GOOD, "refusal"),
        ("I'm sorry I made a mistake. " + GOOD, "refusal"),
        ("The paragraph is already correct.", "already_correct"),
        ("There are no errors in the given paragraph. " + GOOD, "already_correct"),
        ("No changes are needed. " + GOOD, "already_correct"),
        ("Here is the corrected paragraph: " + GOOD, "meta_reply"),
        ("The given paragraph describes a dog. " + GOOD, "meta_reply"),
        ("I removed the repeated sentences. " + GOOD, "meta_reply"),
        ("A dog on a lawn.", "too_short"),
        ("", "too_short"),
        (
            "Das Bild zeigt einen kleinen braunen Hund, der auf einer grünen Wiese vor einem weißen Haus sitzt. "
            "Der Hund schaut in die Kamera und neben seinen Pfoten liegt ein roter Ball unter den Bäumen.",
            "not_english",
        ),
        (
            "图片显示一只小棕狗坐在白色房子前面的绿色草坪上。狗看着相机，耳朵竖起，一个红色的球躺在它的前爪旁边。"
            * 2,
            "not_english",
        ),
        (GOOD + " In the background there are tall trees and a clear blue sky.", "repetition"),
        ("The image shows a dog dog dog on a lawn. " + GOOD, "repetition"),
        (
            "a dog and a cat and a dog and a cat and a dog and a cat and a dog and a cat and a dog and a cat",
            "repetition",
        ),
        (GOOD, None),
        ('"' + GOOD + '"', None),
        ("A sorry-looking dog sits under a sign that says no parking. " + GOOD, None),
        ("The dog is very very happy. " + GOOD, None),
    ],
)
def test_each_rule_drops_its_own_cases(text, rule):
    hit = first_rule(RulesConfig(), normalise(text))
    assert (hit[0] if hit else None) == rule, hit


def test_rules_are_switchable_and_their_thresholds_configurable():
    rules = RulesConfig()
    assert first_rule(rules, "A dog on a lawn.")[0] == "too_short"
    rules.too_short.min_words = 3
    assert first_rule(rules, "A dog on a lawn.") is None
    rules.refusal.enabled = False
    assert first_rule(rules, "I'm sorry, the dog sits on a green lawn.") is None
    rules.refusal.patterns = [r"\bdog\b"]
    rules.refusal.enabled = True
    assert first_rule(rules, "A big dog on a lawn.")[0] == "refusal"
    loop = "one two three four one two three four one two three four five six seven eight nine ten"
    rep = RulesConfig().repetition
    assert check_repetition(rep, loop) is not None
    rep.max_repeated_ngram_ratio = 0.9
    assert check_repetition(rep, loop) is None


def test_normalise_folds_quotes_and_whitespace():
    assert normalise("  \u201cA dog\u2019s  ball.\n\nIt is red.\u201d ") == "A dog's ball. It is red."


def _stores(tmp_path):
    """images + a describe store + a fix store on top of it, covering every way an item can end."""
    img_dir = tmp_path / "images"
    draw_images(str(img_dir), 7, png_every=4)  # img_03 is a PNG
    src = {
        f"img_{i:02d}": {"path": str(img_dir / f"img_{i:02d}.{'png' if i == 3 else 'jpg'}")} for i in range(7)
    }
    desc, fix = str(tmp_path / "desc"), str(tmp_path / "fix")
    open_store(desc, "describe", {}, None, 0)
    with PartWriter(desc, 0) as w:
        w.write(record(k, DONE, source=s, text="raw " + k) for k, s in src.items() if k != "img_06")
        w.write([record("img_06", FAILED, source=src["img_06"], error="unreadable image: truncated")])
    open_store(fix, "fix", {}, desc, 0)
    fixed = {
        "img_00": GOOD,
        "img_01": "I'm sorry, I cannot fix this paragraph.",
        "img_02": GOOD.replace("brown", "black"),
        "img_03": GOOD.replace("dog", "cat"),
    }
    with PartWriter(fix, 0) as w:
        w.write(record(k, DONE, source=src[k], text=t, description="raw " + k) for k, t in fixed.items())
        w.write([record("img_04", FAILED, source=src["img_04"], error="gave up after 6 attempts")])
    # img_05: described but never fixed (fix was stopped).
    return desc, fix, img_dir


def test_filter_writes_cc_sbu_align_and_accounts_for_every_item(tmp_path, capsys):
    _, fix, img_dir = _stores(tmp_path)
    out = tmp_path / "cc_sbu_align"
    assert main(["filter", "--input", fix, "--out", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().err
    with open(out / "filter_cap.json") as f:
        anns = json.load(f)["annotations"]
    assert [a["image_id"] for a in anns] == ["img_00", "img_02", "img_03"]
    assert anns[0] == {"image_id": "img_00", "caption": GOOD}
    assert sorted(os.listdir(out / "image")) == ["img_00.jpg", "img_02.jpg", "img_03.jpg"]
    for a in anns:
        path = out / "image" / f"{a['image_id']}.jpg"
        assert path.read_bytes()[:3] == b"\xff\xd8\xff"
        assert Image.open(path).format == "JPEG"
    assert os.stat(out / "image" / "img_00.jpg").st_ino == os.stat(img_dir / "img_00.jpg").st_ino  # linked
    assert (
        Image.open(out / "image" / "img_03.jpg").size == Image.open(img_dir / "img_03.png").size
    )  # re-encoded
    with open(out / "rejects.jsonl") as f:
        rejects = {r["id"]: r for r in map(json.loads, f)}
    assert {k: r["rule"] for k, r in rejects.items()} == {
        "img_01": "refusal",
        "img_04": "fix_failed",
        "img_05": "fix_pending",
        "img_06": "describe_failed",
    }
    assert rejects["img_04"]["reason"] == "gave up after 6 attempts"
    assert rejects["img_01"]["text"].startswith("I'm sorry")
    with open(out / "filter_report.json") as f:
        report = json.load(f)
    assert report["total"] == 7 and report["kept"] == 3
    assert report["dropped"] == {"refusal": 1, "fix_failed": 1, "fix_pending": 1, "describe_failed": 1}
    lines = {line.split()[0]: line.split()[-1] for line in table.splitlines() if line and line[0].isalpha()}
    assert (
        lines["refusal"] == "1"
        and lines["repetition"] == "0"
        and lines["kept"] == "3"
        and lines["total"] == "7"
    )
    # A re-run gives the same folder and leaves the images in place.
    inode = os.stat(out / "image" / "img_03.jpg").st_ino
    assert main(["filter", "--input", fix, "--out", str(out), "--no-progress"]) == 0
    with open(out / "filter_cap.json") as f:
        assert json.load(f)["annotations"] == anns
    assert os.stat(out / "image" / "img_03.jpg").st_ino == inode


def test_a_broken_image_or_record_is_rejected_not_fatal(tmp_path, capsys):
    _, fix, img_dir = _stores(tmp_path)
    os.remove(img_dir / "img_02.jpg")
    with PartWriter(fix, 1) as w:
        w.write([record("../evil", DONE, source={"path": str(img_dir / "img_00.jpg")}, text=GOOD)])
        w.write([record("no_text", DONE, source={"path": str(img_dir / "img_00.jpg")})])
    report = run_filter(FilterConfig(input=fix, out=str(tmp_path / "out"), link=False, progress=False))
    assert report.kept == 2 and report.total == 9
    assert report.dropped["image_unreadable"] == 1 and report.dropped["bad_record"] == 2
    assert "bad_record" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "evil.jpg")
    assert os.stat(tmp_path / "out" / "image" / "img_00.jpg").st_ino != os.stat(img_dir / "img_00.jpg").st_ino


def test_rule_settings_from_a_file_flags_and_errors(tmp_path, capsys):
    _, fix, _ = _stores(tmp_path)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"refusal": {"enabled": False}, "too_short": {"min_words": 60}}))
    out = tmp_path / "out"
    args = ["filter", "--input", fix, "--out", str(out), "--no-progress", "--rules", str(rules)]
    assert main([*args, "--set", "too_short.min_words=10"]) == 0
    # --set beats the file (60 words would drop every caption); refusal is off, so the 7-word apology
    # is caught by too_short instead.
    with open(out / "filter_cap.json") as f:
        assert len(json.load(f)["annotations"]) == 3
    with open(out / "rejects.jsonl") as f:
        assert {r["id"]: r["rule"] for r in map(json.loads, f)}["img_01"] == "too_short"
    capsys.readouterr()
    assert main([*args, "--print-rules"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["refusal"]["enabled"] is False and printed["too_short"]["min_words"] == 60
    assert main([*args, "--disable", "too_short", "--print-rules"]) == 0
    assert json.loads(capsys.readouterr().out)["too_short"]["enabled"] is False
    assert main([*args, "--set", "too_short.min_wrds=3"]) == 1
    assert "unknown key 'too_short.min_wrds'" in capsys.readouterr().err
    rules.write_text(json.dumps({"too_short": {"min_words": "many"}}))
    assert main(args) == 1
    assert "rules.too_short.min_words: expected an integer" in capsys.readouterr().err
    rules.write_text(json.dumps({"refusal": {"patterns": ["(unclosed"]}}))
    assert main(args) == 1
    assert "rules.refusal.patterns[0]: not a regular expression" in capsys.readouterr().err


def test_filter_refuses_to_write_into_a_store(tmp_path, capsys):
    _, fix, _ = _stores(tmp_path)
    assert main(["filter", "--input", fix, "--out", fix, "--no-progress"]) == 1
    assert "this is a curate store" in capsys.readouterr().err


def test_a_filter_that_keeps_nothing_is_an_error_and_training_says_0_pairs(tmp_path, capsys):
    """Issue 16.7: an empty result exits non-zero, and where it is read it is called 0 pairs."""
    from mgpt4.data.align import load_align

    _, fix, _ = _stores(tmp_path)
    out = tmp_path / "cc_sbu_align"
    rc = main(
        ["filter", "--input", fix, "--out", str(out), "--no-progress", "--set", "too_short.min_words=1000"]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "error: filter kept 0 pairs of 7 item(s)" in err and "rejects.jsonl" in err
    with open(out / "filter_cap.json") as f:
        assert json.load(f) == {"annotations": []}  # this run's result, not a stale one
    with open(out / "rejects.jsonl") as f:
        assert len(f.readlines()) == 7
    with pytest.raises(ValueError, match=r"filter_cap\.json: 0 pairs \(an empty annotations list\)"):
        load_align(str(out))


def test_help_shows_input_and_out_as_required_and_print_rules_needs_neither(capsys):
    with pytest.raises(SystemExit) as done:
        main(["filter", "--help"])
    assert done.value.code == 0
    usage = " ".join(capsys.readouterr().out.split("\n\n")[0].split())
    assert usage.startswith("usage: python -m mgpt4.curate filter [-h] --input INPUT --out OUT [--rejects"), (
        usage
    )
    with pytest.raises(SystemExit) as done:
        main(["filter", "--input", "x"])
    assert done.value.code == 2 and "the following arguments are required: --out" in capsys.readouterr().err
    assert main(["filter", "--print-rules"]) == 0
    assert "too_short" in json.loads(capsys.readouterr().out)

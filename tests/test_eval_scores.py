"""Caption metrics: pycocoevalcap on hand-made predictions with known values, and the references file."""

from __future__ import annotations

import json
import math

import pytest

from mgpt4.eval.references import ReferencesError, check_matches, load_references
from mgpt4.eval.scores import METRICS, score_captions

REFS = {
    "dog": ["A dog runs on the beach.", "A brown dog running along the sand."],
    "cats": ["Two cats sleep on a red sofa."],
    "bus": ["A yellow bus parked next to a building."],
}


def test_a_prediction_equal_to_its_reference_scores_full_marks():
    scores = score_captions({k: v[0] for k, v in REFS.items()}, REFS)
    assert set(scores) == set(METRICS)
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"):
        assert scores[name] == pytest.approx(1.0, abs=1e-6), name
    assert scores["METEOR"] == pytest.approx(1.0) and scores["ROUGE-L"] == pytest.approx(1.0)
    assert scores["CIDEr"] > 1.0


def test_an_unrelated_prediction_scores_lower_on_every_metric():
    same = score_captions({k: v[0] for k, v in REFS.items()}, REFS)
    unrelated = score_captions(
        {"dog": "a bowl of soup on a table", "cats": "an airplane in the sky", "bus": "a man skiing"}, REFS
    )
    for name in METRICS:
        assert unrelated[name] < same[name], name


def test_known_values_of_one_caption():
    """Hand-computed: 4 of 5 unigrams match ('a dog on the'), brevity penalty exp(1 - 6/5); the
    longest common subsequence is 4 words, so ROUGE-L = (1 + 1.2^2) P R / (R + 1.2^2 P), P = 4/5, R = 4/6."""
    scores = score_captions({"dog": "a dog on the grass"}, {"dog": ["A dog runs on the beach."]})
    assert scores["BLEU-1"] == pytest.approx(0.8 * math.exp(-0.2), abs=1e-6)
    p, r = 4 / 5, 4 / 6
    assert scores["ROUGE-L"] == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p), abs=1e-6)
    assert scores["CIDEr"] == 0.0  # one image: every n-gram is in every "document", idf 0


def test_an_empty_prediction_is_scored_as_empty_and_line_breaks_do_not_shift_captions():
    preds = {"dog": "A dog\r runs on the\nbeach.", "cats": "", "bus": REFS["bus"][0]}
    scores = score_captions(preds, REFS)
    full = score_captions({k: v[0] for k, v in REFS.items()}, REFS)
    assert 0 < scores["METEOR"] < full["METEOR"]
    # The caption with the \r still matches its own image exactly (no caption moved to another image).
    one = score_captions({"dog": preds["dog"]}, {"dog": REFS["dog"]})
    assert one["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_mismatched_keys_are_refused():
    with pytest.raises(ValueError, match="only predicted \\['horse'\\]"):
        score_captions({"horse": "a horse"}, {"dog": ["a dog"]})


def _write(tmp_path, data) -> str:
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_references_match_images_by_file_name_or_image_id(tmp_path):
    coco = {
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}, {"id": 7, "file_name": "b.png"}],
        "annotations": [
            {"image_id": 42, "id": 1, "caption": "a cat"},
            {"image_id": 42, "id": 2, "caption": "a small cat"},
            {"image_id": 7, "id": 3, "caption": "a bus"},
        ],
    }
    refs = load_references(_write(tmp_path, coco))
    assert refs.captions == {"COCO_val2014_000000000042": ["a cat", "a small cat"], "b": ["a bus"]}
    assert refs.image_ids == {"COCO_val2014_000000000042": 42, "b": 7}
    bare = load_references(_write(tmp_path, {"annotations": [{"image_id": "img_01", "caption": "x"}]}))
    assert bare.captions == {"img_01": ["x"]}


@pytest.mark.parametrize(
    "data,message",
    [
        ("not json", "not readable JSON"),
        ([{"image_id": 1, "caption": "x"}], "no 'annotations' list"),
        ({"annotations": [{"caption": "x"}]}, r"annotations\[0\] has no image_id"),
        (
            {"annotations": [{"image_id": 1, "caption": ""}]},
            r"annotations\[0\].caption: expected a non-empty",
        ),
        ({"images": [{"id": 1}], "annotations": []}, r"images\[0\]"),
        ({"images": [], "annotations": [{"image_id": 3, "caption": "x"}]}, "not among 'images'"),
        ({"annotations": []}, "'annotations' is empty"),
    ],
)
def test_a_references_file_in_the_wrong_format_says_what_is_expected(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(ReferencesError, match=message) as e:
        load_references(path)
    assert path in str(e.value)


def test_images_without_references_and_references_without_images_are_named(tmp_path):
    refs = load_references(
        _write(tmp_path, {"annotations": [{"image_id": k, "caption": "x"} for k in ("a", "b", "c")]})
    )
    check_matches(["a", "b", "c"], refs, "imgs/")
    with pytest.raises(ReferencesError, match=r"1 image\(s\) of imgs/ have no reference caption .*: d") as e:
        check_matches(["a", "b", "c", "d"], refs, "imgs/")
    assert "referenced" not in str(e.value)
    with pytest.raises(ReferencesError, match=r"1 image\(s\) referenced in .* are not among imgs/: c"):
        check_matches(["a", "b"], refs, "imgs/")

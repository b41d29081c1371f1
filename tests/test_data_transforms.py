"""mgpt4's decode/crop/resize against the official torchvision + PIL transforms, caption cleaning."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from mgpt4.data.batches import BatchText
from mgpt4.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    CROP_UNIFORMS,
    ImageError,
    ImageTransform,
    caption_char_limit,
    clean_caption,
    crop_box,
    cut_caption,
    dct_factor,
    normalize_uint8,
)
from mgpt4.tokenizer import encode_answers
from tests.data_fixtures import WORDS, jpeg, tiny_tokenizer

OFFICIAL_NORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("height,width", [(600, 800), (300, 1000), (224, 224)])
def test_crop_box_distribution_matches_torchvision(height, width):
    n = 3000
    rng = np.random.default_rng(0)
    ours = np.array([crop_box(height, width, rng.random(CROP_UNIFORMS)) for _ in range(n)], dtype=np.float64)
    torch.manual_seed(0)
    dummy = torch.empty(3, height, width)
    ref = np.array(
        [transforms.RandomResizedCrop.get_params(dummy, [0.5, 1.0], [3 / 4, 4 / 3]) for _ in range(n)],
        dtype=np.float64,
    )
    for boxes in (ours, ref):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()
    # 2-sample KS critical value at alpha=0.001 for n=m=3000 is about 0.05.
    stats = {
        "area": lambda b: b[:, 2] * b[:, 3] / (height * width),
        "aspect": lambda b: b[:, 3] / b[:, 2],
        "centre_y": lambda b: (b[:, 0] + b[:, 2] / 2) / height,
        "centre_x": lambda b: (b[:, 1] + b[:, 3] / 2) / width,
    }
    for name, f in stats.items():
        assert _ks(f(ours), f(ref)) < 0.05, name


def test_dct_factor_keeps_the_crop_at_least_the_output_size():
    assert dct_factor(448, 448, 224) == 2
    assert dct_factor(447, 900, 224) == 1
    assert dct_factor(900, 900, 224) == 4
    assert dct_factor(1792, 1800, 224) == 8
    assert dct_factor(5000, 5000, 224) == 8
    assert dct_factor(100, 100, 224) == 1


def _official_crop(data: bytes, box, size: int = 224) -> np.ndarray:
    top, left, h, w = box
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)).astype(
        np.float64
    )


def _ours(transform: ImageTransform, data: bytes, box) -> np.ndarray:
    out = torch.empty(3, transform.size, transform.size, dtype=torch.uint8)
    transform.render(data, box, out)
    return out.permute(1, 2, 0).numpy().astype(np.float64)


def test_full_scale_decode_equals_official_crop():
    data = jpeg(300, 260, seed=1)
    box = (10, 20, 200, 230)  # too small for a reduced decode: the pixels must be the official ones
    assert dct_factor(200, 230, 224) == 1
    diff = np.abs(_ours(ImageTransform(224), data, box) - _official_crop(data, box))
    assert diff.mean() < 0.05 and diff.max() <= 2


@pytest.mark.parametrize("box,factor", [((30, 40, 500, 560), 2), ((0, 0, 900, 1000), 4)])
def test_reduced_scale_decode_matches_official_crop(box, factor):
    data = jpeg(1000, 900, seed=2, quality=92)
    assert dct_factor(box[2], box[3], 224) == factor
    ours, ref = _ours(ImageTransform(224), data, box), _official_crop(data, box)
    diff = np.abs(ours - ref)
    assert diff.mean() < 3.0, diff.mean()
    np.testing.assert_allclose(ours.mean(axis=(0, 1)), ref.mean(axis=(0, 1)), atol=1.5)
    np.testing.assert_allclose(ours.std(axis=(0, 1)), ref.std(axis=(0, 1)), rtol=0.03)


def _sharpness(images: np.ndarray) -> np.ndarray:
    """Mean absolute horizontal gradient per image: blur from a wrong decode scale would lower it."""
    return np.abs(np.diff(images, axis=2)).mean(axis=(1, 2, 3))


def _mean_and_se(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.abs(a.mean(axis=0) - b.mean(axis=0)), np.sqrt(a.var(axis=0) / len(a) + b.var(axis=0) / len(b))


@pytest.fixture
def one_thread():
    """Resizing small images gains nothing from threads, and on a busy machine they only wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_random_crops_have_official_statistics(one_thread):
    """Many RandomResizedCrops of large JPEGs through both pipelines: same pixel statistics.

    The reduced-scale decode is used for most of these crops; it may make them slightly crisper
    (DCT downscaling aliases a little more than PIL's bicubic), bounded here, and with the shortcut
    off (dct_margin 2 turns it off for these sizes) the crispness matches too.
    """
    images = [jpeg(820, 640, seed=3), jpeg(640, 960, seed=4)]
    official = transforms.Compose(
        [
            transforms.RandomResizedCrop(224, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
            OFFICIAL_NORM,
        ]
    )
    torch.manual_seed(0)
    n = 120
    ref = np.stack([official(Image.open(io.BytesIO(images[i % 2])).convert("RGB")).numpy() for i in range(n)])
    for margin, max_excess in ((1.0, 0.06), (2.0, 0.0)):
        transform = ImageTransform(224, dct_margin=margin)
        rng = np.random.default_rng(0)
        out = torch.empty(n, 3, 224, 224, dtype=torch.uint8)
        for i in range(n):
            transform(images[i % 2], rng.random(CROP_UNIFORMS), out[i])
        ours = normalize_uint8(out).numpy()
        for stat in (lambda x: x.mean(axis=(2, 3)), lambda x: x.std(axis=(2, 3))):
            diff, se = _mean_and_se(stat(ours), stat(ref))  # per channel
            assert (diff < 4 * se + 1e-3).all(), (margin, diff, se)
        sa, sb = _sharpness(ours), _sharpness(ref)
        diff, se = _mean_and_se(sa, sb)
        assert diff < 4 * se + max_excess * sb.mean(), (margin, sa.mean() / sb.mean())


def test_eval_transform_matches_official_resize():
    data = jpeg(700, 520, seed=5)
    out = torch.empty(3, 224, 224, dtype=torch.uint8)
    ImageTransform(224, train=False)(data, None, out)
    official = transforms.Compose(
        [transforms.Resize((224, 224), interpolation=InterpolationMode.BICUBIC), OFFICIAL_NORM]
    )
    ref = official(Image.open(io.BytesIO(data)).convert("RGB"))
    ours = normalize_uint8(out[None])[0]
    assert (ours - ref).abs().mean() < 3.0 / (255 * 0.26)
    torch.testing.assert_close(ours.mean(dim=(1, 2)), ref.mean(dim=(1, 2)), atol=0.01, rtol=0)


def test_normalize_matches_totensor_normalize():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 3, 16, 16), dtype=np.uint8)
    ours = normalize_uint8(torch.from_numpy(pixels))
    ref = torch.stack([OFFICIAL_NORM(Image.fromarray(p.transpose(1, 2, 0))) for p in pixels])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    assert normalize_uint8(torch.from_numpy(pixels), torch.bfloat16).dtype == torch.bfloat16
    # Channels-last uint8 input (how workers may hand out images) gives the same contiguous result.
    cl = torch.from_numpy(pixels).contiguous(memory_format=torch.channels_last)
    out = normalize_uint8(cl)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ours)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs_become_rgb(mode):
    data = jpeg(300, 280, seed=6, mode=mode)
    out = torch.zeros(3, 64, 64, dtype=torch.uint8)
    ImageTransform(64, train=False)(data, None, out)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.BICUBIC))
    assert np.abs(out.permute(1, 2, 0).numpy().astype(float) - ref).mean() < 4.0


def test_png_is_decoded():
    img = Image.fromarray(np.full((50, 70, 3), (10, 200, 30), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = torch.zeros(3, 32, 32, dtype=torch.uint8)
    ImageTransform(32, train=False)(buf.getvalue(), None, out)
    assert out[:, 5, 5].tolist() == [10, 200, 30]


def test_damaged_images_raise_with_a_reason():
    data = jpeg(200, 160, seed=7)
    out = torch.empty(3, 32, 32, dtype=torch.uint8)
    t = ImageTransform(32)
    u = np.full(CROP_UNIFORMS, 0.5)
    with pytest.raises(ImageError) as e:
        t(data[: len(data) // 2], u, out)
    assert e.value.reason == "truncated_image"
    with pytest.raises(ImageError) as e:
        t(b"this is not an image at all" * 10, u, out)
    assert e.value.reason == "corrupt_image"
    with pytest.raises(ImageError) as e:
        t(b"", u, out)
    assert e.value.reason == "corrupt_image"


def test_clean_caption_follows_the_official_rules():
    assert clean_caption("A Dog!  Running (fast)*; on: the ~beach.") == "a dog running fast on the beach"
    assert clean_caption('He said "hi"#tag') == "he said hi tag"
    assert clean_caption("  Trailing space\n") == "trailing space"
    long = " ".join(f"w{i}" for i in range(80))
    assert clean_caption(long).split(" ") == [f"w{i}" for i in range(50)]
    assert clean_caption(long, max_words=3) == "w0 w1 w2"


@pytest.mark.parametrize("kind", ["base64", "words", "spaces", "unicode"])
def test_a_huge_caption_is_cut_by_characters_and_keeps_the_same_tokens(kind):
    """A 1.5 MB alt text (base64) is cut to caption_char_limit characters before tokenizing; the
    max_txt_len ids kept, end symbol and padding included, are exactly those of the uncut caption."""
    rng = np.random.default_rng(0)
    size = 300_000  # far above the limit; the whole 1.5 MB would only slow the uncut reference down
    if kind == "base64":
        caption = "data:image/png;base64," + base64.b64encode(rng.bytes(size * 3 // 4)).decode()
    elif kind == "words":
        caption = " ".join(rng.choice(WORDS.split(), size // 6))
    elif kind == "spaces":
        caption = "a red " + " " * size + "circle"
    else:
        caption = "".join(chr(c) for c in rng.integers(0x4E00, 0x4F00, size))
    tokenizer = tiny_tokenizer()
    for max_txt_len in (12, 32, 160):
        text = BatchText(tokenizer, max_txt_len, "###")
        limit = caption_char_limit(tokenizer, max_txt_len)
        assert text.caption_chars == limit < size
        cut = cut_caption(caption, limit, tokenizer, max_txt_len)
        assert len(cut) == limit
        ids, mask = text.encode([caption, "a red circle"])
        full = encode_answers(tokenizer, [caption, "a red circle"], "###", max_txt_len)
        assert torch.equal(ids, full[0]) and torch.equal(mask, full[1])
        assert cut_caption("a red circle", limit, tokenizer, max_txt_len) == "a red circle"


class _Collapsing:
    """A tokenizer whose normalizer drops runs of spaces (as SentencePiece's remove_extra_whitespaces)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id

    def get_vocab(self):
        return self.tokenizer.get_vocab()

    def __call__(self, texts, **kw):
        squeeze = lambda t: re.sub(" +", " ", t)  # noqa: E731
        return self.tokenizer(
            [squeeze(t) for t in texts] if isinstance(texts, list) else squeeze(texts), **kw
        )


def test_a_cut_that_would_leave_too_few_tokens_is_not_made():
    """Where the normalizer drops characters the first characters may hold fewer tokens than assumed:
    the caption is then tokenized whole, and the ids are still those of the uncut caption."""
    tokenizer = _Collapsing(tiny_tokenizer())
    caption = "a red " + " " * 100_000 + "circle on the left"
    limit = caption_char_limit(tokenizer, 12)
    assert cut_caption(caption, limit, tokenizer, 12) == caption
    ids, _ = BatchText(tokenizer, 12, "###").encode([caption])
    assert torch.equal(ids, encode_answers(tokenizer, [caption], "###", 12)[0])
    assert ids[0, 2] != tokenizer.pad_token_id  # "circle" and what follows are kept

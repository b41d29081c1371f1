"""Typed configuration of the data side: where samples come from and how batches are made.

The training config nests `DataConfig` as `data`; the text lengths (`max_txt_len`, `end_sym`) are not
here because they belong to the model's `TextConfig` and are passed to `build_loader`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mgpt4.strict_config import ConfigError

KINDS = ("webdataset", "align", "features", "conversations")
# How a stage-1 source stores its samples: img2dataset shards, or an annotation file and an image folder
# (`mgpt4.data.formats`).
SOURCE_FORMATS = ("webdataset", "llava", "sharegpt", "huggingface")
# The stage-1 kinds: image shards, or feature shards extracted from them.
STAGE1_KINDS = ("webdataset", "features")
MIX_MODES = ("batch", "sample")
TRANSFORMS = ("train", "eval")
CROP_DRAWS = ("stream", "sample")


@dataclass
class SourceConfig:
    """One stage-1 source (e.g. LAION or CC/SBU): webdataset shards or an annotation file.

    `shards` is a string or a list of strings; each string is a brace pattern
    (`/data/laion/{00000..10488}.tar`), a single URL, a `pipe:` command (`pipe:aws s3 cp s3://b/{0..9}.tar -`)
    or `@FILE`, a text file with one URL or pattern per line (`#` starts a comment).

    With `format` llava or sharegpt the source is `annotations`, a JSON list or JSONL file
    (`mgpt4.data.formats.records` lists the spellings), read as image-caption pairs: the entry's one
    image (a path under `image_root`) and its first assistant turn.
    """

    name: str = ""
    shards: str | list[str] = field(default_factory=list)
    # Relative weight; the official recipe draws LAION : CC/SBU as 115 : 14.
    ratio: float = 1.0
    format: str = "webdataset"  # one of SOURCE_FORMATS
    annotations: str = ""  # format llava / sharegpt: the .json or .jsonl file
    image_root: str = ""  # where the entries' relative image paths start; "": the annotation file's folder
    # Format huggingface (`annotations`: parquet file(s), a folder of them, a glob, or a save_to_disk
    # folder): the column of the image ({bytes, path}, a path or a list; "": "image") and of the text
    # (a caption or a list of messages; "": "caption").
    image_column: str = ""
    text_column: str = ""

    def is_annotations(self) -> bool:
        return self.format != "webdataset"

    def reads_annotations(self, kind: str) -> bool:
        """Whether training of `kind` reads this source's annotation file; under kind 'features' an
        annotation source reads the feature shards extracted from it instead (`data.features_root`)."""
        return self.is_annotations() and kind != "features"

    def validate(self, kind: str, where: str) -> None:
        if self.format not in SOURCE_FORMATS:
            raise ConfigError(f"{where}.format: expected one of {SOURCE_FORMATS}, got {self.format!r}")
        if not self.is_annotations():
            if not self.shards:
                raise ConfigError(f"{where}.shards: empty; give a brace pattern, a list of URLs or @FILE")
            for name in ("annotations", "image_root", "image_column", "text_column"):
                if getattr(self, name):
                    raise ConfigError(f"{where}.{name}: not for format webdataset")
            return
        if self.shards:
            raise ConfigError(f"{where}.shards: a {self.format} source reads {where}.annotations, not shards")
        if not self.annotations:
            what = (
                "the parquet file(s) or save_to_disk folder"
                if self.format == "huggingface"
                else "the .json or .jsonl file"
            )
            raise ConfigError(f"{where}.annotations: format {self.format!r} needs {what}")
        if self.format != "huggingface":
            for name in ("image_column", "text_column"):
                if getattr(self, name):
                    raise ConfigError(f"{where}.{name}: only for format huggingface")


@dataclass
class ValConfig:
    """Held-out samples for the validation loss (`train.eval_every`): the first `samples` usable ones of
    the source, in its order, with the eval transform and an instruction fixed per sample, so every
    evaluation of every run on the same data sees the same inputs (`mgpt4.data.heldout`).

    Stage 1 (`kind: webdataset`) reads `shards`; stage 2 (`kind: align`) reads the cc_sbu_align
    folder `align_root`, or holds out `holdout` pairs of the training folder (`data.align_root`),
    which training then never sees.
    """

    samples: int = 0  # N; 0 turns validation off
    shards: str | list[str] = field(default_factory=list)  # as a source's shards
    align_root: str | None = None
    holdout: int = 0
    batch_size: int | None = None  # per rank; None: data.batch_size

    def enabled(self) -> bool:
        return self.samples > 0

    def validate(self, kind: str, path: str = "data.val") -> None:
        if kind == "conversations" and self.enabled():
            raise ConfigError(
                f"{path}.samples: held-out validation reads captions (stage-1 shards or cc_sbu_align), not "
                f"conversations; set {path}.samples=0 for kind 'conversations'"
            )
        if self.samples < 0:
            raise ConfigError(f"{path}.samples: expected 0 (no validation) or more, got {self.samples!r}")
        if self.holdout < 0:
            raise ConfigError(f"{path}.holdout: expected 0 or more, got {self.holdout!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(
                f"{path}.batch_size: expected a positive integer or null, got {self.batch_size!r}"
            )
        given = [n for n in ("shards", "align_root", "holdout") if getattr(self, n)]
        if not self.enabled():
            if given:
                raise ConfigError(
                    f"{path}.{given[0]} is set but {path}.samples is 0: set {path}.samples to the number of "
                    f"held-out samples to evaluate"
                )
            return
        if kind in STAGE1_KINDS:  # 'features' too: held-out images go through the model's vision path
            if given != ["shards"]:
                wrong = [n for n in given if n != "shards"]
                raise ConfigError(
                    f"{path}.{wrong[0]}: only for kind 'align'"
                    if wrong
                    else f"{path}.shards: kind {kind!r} validates on held-out shards (of images); give them "
                    f"(or set {path}.samples=0)"
                )
            return
        if "shards" in given:
            raise ConfigError(
                f"{path}.shards: only for the stage-1 kinds {STAGE1_KINDS}; use {path}.align_root or {path}.holdout"
            )
        if len(given) != 1:
            raise ConfigError(
                f"{path}: kind 'align' validates on {path}.align_root (a held-out cc_sbu_align folder) or "
                f"{path}.holdout (pairs held out of data.align_root): give exactly one"
            )
        if self.holdout and self.samples > self.holdout:
            raise ConfigError(
                f"{path}.samples: {self.samples} is more than the {self.holdout} held-out pairs ({path}.holdout)"
            )


@dataclass
class DataConfig:
    # "webdataset": stage-1 shards from `sources`; "align": the stage-2 cc_sbu_align folder `align_root`;
    # "features": feature shards written by `python -m mgpt4.features extract` (the Q-Former's output per
    # sample instead of its image: no decode, no ViT and no Q-Former in the step), mixed as `sources`.
    # "conversations": stage 2 on multi-turn conversations, `sources` of format llava or sharegpt mixed by
    # ratio, each rendered in the model's template with the loss on the answers (`mgpt4.model.conversation_text`).
    kind: str = "webdataset"
    sources: list[SourceConfig] = field(default_factory=list)
    # "batch": every batch comes from one source drawn by ratio (the official MultiIterLoader);
    # "sample": every sample draws its source.
    mix: str = "batch"
    # True: each reader draws shards with replacement (the official ResampledShards). False: the shards
    # are split over ranks x workers, each reader walks its own share in a fresh order every epoch.
    resampled: bool = True
    # Each reader shuffles blocks of this many raw samples (the official shuffle buffer is 1000).
    shuffle_buffer: int = 1000
    align_root: str | None = None
    batch_size: int = 64  # per rank; packed (pack_length > 0): the most samples a batch holds
    num_workers: int = 4  # per rank; 0 reads in the trainer's process
    prefetch: int = 2  # batches each worker keeps ready
    pin_memory: bool = True  # only takes effect when CUDA is available
    image_size: int = 224
    # "train": RandomResizedCrop(image_size, crop_scale, ratio 3/4-4/3, bicubic). "eval": bicubic resize
    # of the whole image to image_size x image_size.
    transform: str = "train"
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # None follows the official recipe: cleaned for webdataset (stage 1), raw for align (stage 2).
    clean_captions: bool | None = None
    caption_max_words: int = 50
    # Decode-time shortcuts of libjpeg-turbo (fast integer IDCT, plain chroma upsampling): a few percent
    # faster, pixels differ by about one level from the exact decode the official pipeline does.
    fast_decode: bool = False
    # A JPEG is decoded at 1/2, 1/4 or 1/8 scale when the crop stays at least dct_margin x image_size
    # there. DCT downscaling aliases a little more than a bicubic resize, so crops whose final resize is
    # nearly 1:1 come out slightly crisper: about +2.6% mean absolute gradient at 1.0, +1% at 1.25, none
    # at 2.0 (which turns the shortcut off for images under 4x image_size) on noisy 500-1000 px images.
    dct_margin: float = 1.0
    seed: int = 0
    val: ValConfig = field(default_factory=ValConfig)
    # "stream": each crop is drawn from the reader's position, so a sample gets a fresh crop every time
    # it comes round (the official RandomResizedCrop). "sample": drawn from the sample's shard file name
    # and key, the same crop every time: the one crop a feature cache holds (extraction draws it so).
    crops: str = "stream"
    # kind "features": source i reads features_root/<source name>/<file name of each of its shards>, the
    # layout extraction writes, so a recipe's own shard patterns name the feature shards. None: the
    # sources' `shards` are the feature shards themselves.
    features_root: str | None = None
    # Packing (stage 1). 0: one sample per row, its answer padded to max_txt_len (the official layout).
    # N: each batch is `pack_rows` rows of N tokens, each row holding whole samples one after another
    # (attention, positions and labels never cross samples), and `batch_size` becomes the most samples a
    # batch holds: a batch ends when its rows or its batch_size slots are full, so it holds about (not
    # exactly) batch_size samples when pack_rows x pack_length ~ batch_size x the mean sample length.
    pack_length: int = 0
    pack_rows: int = 0
    # Kind "conversations": text positions of a rendered conversation (image tokens not counted), the
    # static length of its batches; a longer one keeps its first exchanges that fit.
    conversation_tokens: int = 512

    def validate(self, path: str = "data") -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"{path}.kind: expected one of {KINDS}, got {self.kind!r}")
        if self.mix not in MIX_MODES:
            raise ConfigError(f"{path}.mix: expected one of {MIX_MODES}, got {self.mix!r}")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"{path}.transform: expected one of {TRANSFORMS}, got {self.transform!r}")
        for name in ("batch_size", "image_size", "shuffle_buffer", "prefetch", "caption_max_words"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.crops not in CROP_DRAWS:
            raise ConfigError(f"{path}.crops: expected one of {CROP_DRAWS}, got {self.crops!r}")
        self._validate_packing(path)
        if self.kind == "features" and self.crops != "stream":
            raise ConfigError(
                f"{path}.crops: a feature cache's crops were fixed at extraction; leave it 'stream'"
            )
        if self.features_root is not None and self.kind != "features":
            raise ConfigError(f"{path}.features_root: only kind 'features' reads it (kind is {self.kind!r})")
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers: expected 0 or more, got {self.num_workers!r}")
        if self.dct_margin < 1.0:
            raise ConfigError(
                f"{path}.dct_margin: expected at least 1.0 (never upscale a reduced decode), got {self.dct_margin!r}"
            )
        lo_hi = self.crop_scale
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ConfigError(
                f"{path}.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {lo_hi!r}"
            )
        if self.conversation_tokens < 1:
            raise ConfigError(
                f"{path}.conversation_tokens: expected a positive integer, got {self.conversation_tokens!r}"
            )
        if self.kind in (*STAGE1_KINDS, "conversations"):
            if not self.sources:
                raise ConfigError(f"{path}.sources: kind {self.kind!r} needs at least one source with shards")
            names = set()
            for i, src in enumerate(self.sources):
                where = f"{path}.sources[{i}]"
                src.validate(self.kind, where)
                if self.kind == "features" and src.is_annotations() and not self.features_root:
                    raise ConfigError(
                        f"{where}.format: kind 'features' reads a {src.format} source's features from "
                        f"{path}.features_root/<source name>/ (the folder `python -m mgpt4.features extract` "
                        f"wrote); set {path}.features_root"
                    )
                if self.kind == "conversations" and not src.is_annotations():
                    raise ConfigError(
                        f"{where}.format: kind 'conversations' reads the formats llava, sharegpt and "
                        "huggingface, got webdataset"
                    )
                if not src.ratio > 0:
                    raise ConfigError(f"{where}.ratio: expected a positive number, got {src.ratio!r}")
                label = src.name or f"source{i}"
                if label in names:
                    raise ConfigError(f"{where}.name: {label!r} is used by another source")
                names.add(label)
        if self.kind == "align" and not self.align_root:
            raise ConfigError(f"{path}.align_root: kind 'align' needs the cc_sbu_align folder")
        self.val.validate(self.kind, f"{path}.val")

    def _validate_packing(self, path: str) -> None:
        if self.pack_length < 0 or self.pack_rows < 0:
            raise ConfigError(f"{path}.pack_length / pack_rows: expected 0 or more")
        if self.pack_length == 0:
            if self.pack_rows:
                raise ConfigError(f"{path}.pack_rows: set {path}.pack_length too (0 packs nothing)")
            return
        if self.kind == "align":
            raise ConfigError(
                f"{path}.pack_length: packing is for the stage-1 kinds 'webdataset' and 'features', not 'align'"
            )
        if self.pack_rows < 1:
            raise ConfigError(
                f"{path}.pack_rows: packing needs the number of rows per batch; choose pack_rows x pack_length "
                f"about {path}.batch_size ({self.batch_size}) x the mean sample length in tokens"
            )

    def packs(self) -> bool:
        return self.pack_length > 0

    def source_names(self) -> list[str]:
        return [s.name or f"source{i}" for i, s in enumerate(self.sources)]

    def cleans_captions(self) -> bool:
        if self.clean_captions is not None:
            return self.clean_captions
        return self.kind in STAGE1_KINDS

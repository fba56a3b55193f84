"""Booru-style tags from a WD tagger: ``python -m core caption DIR --captioner wd14``.

A WD tagger (the WD 1.4 / WD v3 family) is an image classifier over a few
thousand booru tags, shipped as two files in one folder or hub repository:

* ``model.onnx``: NHWC float32 input (batch, size, size, 3), BGR, 0-255;
  output (batch, tags): one sigmoid score per tag;
* ``selected_tags.csv``: one row per output, columns ``tag_id,name,category,count``;
  category 9 is a rating (general, sensitive, ...), 4 a character, 0 a general tag.

The caption is the character tags scoring above ``character_threshold``,
then the general tags above ``threshold``, each group by score (highest
first), comma-separated, written the way A1111-style prompts spell them:
underscores become spaces (not in emoticons such as ``^_^``) and
parentheses are escaped (``star \\(symbol\\)``). Rating tags are left out
unless asked for. onnxruntime runs it on the GPU when the onnxruntime-gpu
build is installed, else on the CPU; torch is not needed.

``write_tiny_tagger`` builds a random-weight tagger in the same layout
(with the ``onnx`` package), for tests and the offline demo.
"""

from __future__ import annotations

import csv
import gc
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.captioning.caption import CaptionerBase, CaptionError, download_hint, load_failure, model_source

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

DEFAULT_WD14 = "SmilingWolf/wd-swinv2-tagger-v3"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
GENERAL, CHARACTER, RATING = 0, 4, 9  # selected_tags.csv categories
DEFAULT_SIZE = 448  # the WD v3 input size, used when a model leaves its size open
_FILES = f"{MODEL_FILE} and {TAGS_FILE}"
_DOWNLOAD = f"{MODEL_FILE} {TAGS_FILE}"  # as `hf download REPO FILE...` takes them
# An emoticon such as ^_^, o_o or >_<: no run of two letters, so its underscore is part of the face.
_EMOTICON = re.compile(r"[^A-Za-z_]*[A-Za-z]?[^A-Za-z_]*_[^A-Za-z_]*[A-Za-z]?[^A-Za-z_]*")


@dataclass(frozen=True)
class Tag:
    name: str  # as in selected_tags.csv, underscores and all
    category: int


# --------------------------------------------------------------------------
# tags: from scores to a caption (no model needed; unit-tested on its own)


def format_tag(name: str) -> str:
    """A tag as prompts write it: ``long_hair`` -> ``long hair``, ``star_(symbol)`` -> ``star \\(symbol\\)``.

    Emoticons keep their underscore (``^_^``, ``o_o``); parentheses are
    escaped, because A1111-style prompt parsers read bare ones as emphasis.
    """
    text = name.strip()
    if not is_emoticon(text):
        text = text.replace("_", " ")
    return text.replace("(", "\\(").replace(")", "\\)")


def is_emoticon(name: str) -> bool:
    """True for a face such as ``^_^``, ``o_o``, ``>_<`` or ``(o)_(o)``: its underscore is drawn, not a space."""
    return len(name) <= 9 and bool(_EMOTICON.fullmatch(name))


def tag_key(tag: str) -> str:
    """What a tag is compared by in an exclude list: any case, ``_`` or space, escaped or not."""
    text = tag.strip().replace("\\(", "(").replace("\\)", ")")
    if not is_emoticon(text):
        text = text.replace("_", " ")
    return " ".join(text.split()).casefold()


def parse_tag_list(text: str | Iterable[str] | None) -> list[str]:
    """``"1girl, solo,, long_hair"`` (or a list) -> ``["1girl", "solo", "long_hair"]``."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    return [item.strip() for item in items if item and item.strip()]


def select_tags(tags: Sequence[Tag], scores: Sequence[float], threshold: float = 0.35,
                character_threshold: float = 0.85, exclude: Iterable[str] = (),
                include_rating: bool = False) -> list[str]:
    """The caption's tags, formatted: characters above ``character_threshold``, then general tags
    above ``threshold``, each group highest score first; the top rating tag first with ``include_rating``.

    Tags in ``exclude`` (compared by ``tag_key``) are left out; other categories are ignored.
    """
    if len(tags) != len(scores):
        raise ValueError(f"{len(tags)} tags but {len(scores)} scores")
    excluded = {tag_key(t) for t in exclude}
    ranked = sorted(zip(tags, (float(s) for s in scores), strict=True), key=lambda pair: -pair[1])

    def picked(category: int, floor: float) -> list[str]:
        return [format_tag(tag.name) for tag, score in ranked
                if tag.category == category and score > floor and tag_key(tag.name) not in excluded]

    chosen = picked(CHARACTER, character_threshold) + picked(GENERAL, threshold)
    if include_rating:
        ratings = [tag for tag, _ in ranked if tag.category == RATING and tag_key(tag.name) not in excluded]
        chosen = [format_tag(t.name) for t in ratings[:1]] + chosen
    return chosen


def read_tags(path: str | Path) -> list[Tag]:
    """The rows of a ``selected_tags.csv``; ``CaptionError`` saying what is wrong with the file."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise CaptionError(f"cannot read the tag list {path} ({e}); download the tagger again") from e
    reader = csv.DictReader(io.StringIO(text))
    missing = {"name", "category"} - set(reader.fieldnames or [])
    if missing:
        raise CaptionError(f"the tag list {path} has no {' or '.join(sorted(missing))} column (a WD tagger's "
                           f"{TAGS_FILE} has tag_id,name,category,count); download the tagger again")
    tags = []
    for line, row in enumerate(reader, start=2):
        try:
            tags.append(Tag(row["name"], int(row["category"])))
        except (TypeError, ValueError) as e:
            raise CaptionError(f"the tag list {path}, line {line}: category {row.get('category')!r} is not a "
                               "number; download the tagger again") from e
    if not tags:
        raise CaptionError(f"the tag list {path} lists no tags; download the tagger again")
    return tags


# --------------------------------------------------------------------------
# the tagger


def prepare(image: Image.Image, size: int) -> np.ndarray:
    """One RGB picture as the tagger reads it: padded square on white, ``size`` px, BGR, float32 0-255, HWC."""
    import numpy as np
    from PIL import Image

    from core.data.images import to_rgb

    if image.mode != "RGB":
        image = to_rgb(image)  # transparent pixels on white, as the taggers were trained
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(pixels[:, :, ::-1])  # RGB -> BGR


class WdTagger(CaptionerBase):
    """A WD tagger (``model.onnx`` + ``selected_tags.csv``) run with onnxruntime; its captions are tags.

    ``model`` is a folder holding both files or a hub id (only those two
    files are downloaded). ``device``: None picks the GPU when the
    onnxruntime-gpu build sees one, else the CPU; "cpu" or "cuda[:N]" force one.
    """

    @staticmethod
    def write_tiny(directory, seed: int = 0) -> Path:
        return write_tiny_tagger(directory, seed)

    name = "wd14"
    default_model = suggested_model = DEFAULT_WD14
    options = {"threshold": 0.35, "character_threshold": 0.85, "exclude_tags": "", "include_rating": False}
    empty_reason = "no tag scored above the threshold (lower --threshold to get more tags)"

    @classmethod
    def check_model(cls, model: str) -> None:
        source = Path(model_source(model or cls.default_model, cls.default_model, _FILES, _DOWNLOAD))
        if source.is_dir():
            _check_folder(source, model)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        options = super().check_options(options)
        for key in ("threshold", "character_threshold"):
            value = options[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise CaptionError(f"--{key.replace('_', '-')} must be a score between 0 and 1, got {value!r}",
                                   kind="config")
        options["exclude_tags"] = parse_tag_list(options["exclude_tags"])
        options["include_rating"] = bool(options["include_rating"])
        return options

    def __init__(self, model: str = "", device: str | None = None, threshold: float = 0.35,
                 character_threshold: float = 0.85, exclude_tags: str | Iterable[str] = "",
                 include_rating: bool = False):
        self.model_id = model or self.default_model
        self.threshold, self.character_threshold = threshold, character_threshold
        self.exclude = parse_tag_list(exclude_tags)
        self.include_rating = include_rating
        folder = self._folder()
        self.tags = read_tags(folder / TAGS_FILE)
        self.session = self._session(folder / MODEL_FILE, device)
        self.input_name, self.size = self._input()
        self._check_outputs()

    def _folder(self) -> Path:
        """The local folder with both files: the one given, or the hub snapshot (downloaded if need be)."""
        source = model_source(self.model_id, self.default_model, _FILES, _DOWNLOAD)
        path = Path(source)
        if not path.is_dir():
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                path = Path(snapshot_download(source, allow_patterns=[MODEL_FILE, TAGS_FILE]))
            except (OSError, ValueError, EntryNotFoundError) as e:
                raise CaptionError(load_failure(self.model_id, e, f"a WD tagger's {_FILES}",
                                                self.default_model, _DOWNLOAD)) from e
        _check_folder(path, self.model_id)
        return path

    def _session(self, onnx_file: Path, device: str | None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise CaptionError("the wd14 tagger needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu "
                               "for NVIDIA GPUs)", kind="config") from e
        providers = _providers(device, ort.get_available_providers())
        settings = ort.SessionOptions()
        settings.log_severity_level = 3  # errors only: its warnings would bury the job's own lines
        try:
            return ort.InferenceSession(str(onnx_file), sess_options=settings, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            detail = " ".join(str(e).split())[:300]
            raise CaptionError(f"cannot load the tagger model {onnx_file} ({type(e).__name__}: {detail}); the "
                               f"file is damaged or not an ONNX model. Download it again, e.g. "
                               f"{download_hint(self.model_id, self.default_model, _DOWNLOAD)}") from e

    def _input(self) -> tuple[str, int]:
        """The input's name and picture size, read from its (batch, size, size, 3) shape."""
        inputs = self.session.get_inputs()
        shape = list(inputs[0].shape) if len(inputs) == 1 else []
        if len(shape) != 4 or shape[3] != 3:
            raise CaptionError(f"the tagger model of {self.model_id} takes input(s) "
                               f"{[(i.name, i.shape) for i in inputs]}; a WD tagger takes one picture batch "
                               "shaped (batch, size, size, 3). Use a WD 1.4 / WD v3 tagger such as "
                               f"{DEFAULT_WD14}")
        height, width = shape[1], shape[2]
        if isinstance(height, int) and isinstance(width, int):
            if height != width:
                raise CaptionError(f"the tagger model of {self.model_id} takes {width}x{height} pictures; a WD "
                                   "tagger takes square ones")
            return inputs[0].name, height
        return inputs[0].name, DEFAULT_SIZE

    def _check_outputs(self) -> None:
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(self.tags):
            raise CaptionError(f"the tagger model of {self.model_id} scores {width} tags but its {TAGS_FILE} "
                               f"lists {len(self.tags)}: the two files come from different taggers. Download "
                               f"both again, e.g. {download_hint(self.model_id, self.default_model, _DOWNLOAD)}")

    def scores(self, images: list[Image.Image]) -> np.ndarray:
        """One row of tag scores per picture."""
        import numpy as np

        if self.session is None:
            raise CaptionError("this captioner was closed; create a new one", kind="config")
        batch = np.stack([prepare(image, self.size) for image in images])
        return self.session.run(None, {self.input_name: batch})[0]

    def caption(self, images: list[Image.Image], max_new_tokens: int | None = None) -> list[str]:
        """One caption per RGB picture: its tags, comma-separated (``max_new_tokens`` does not apply)."""
        if not images:
            return []
        return [", ".join(select_tags(self.tags, row, self.threshold, self.character_threshold, self.exclude,
                                      self.include_rating))
                for row in self.scores(list(images))]

    def close(self) -> None:
        """Free the model (and the GPU memory onnxruntime held for it)."""
        self.session = None
        gc.collect()


def _check_folder(folder: Path, model: str) -> None:
    missing = [name for name in (MODEL_FILE, TAGS_FILE) if not (folder / name).is_file()]
    if missing:
        where = f"the folder {folder}" if Path(model).expanduser().is_dir() else f"the download of {model}"
        raise CaptionError(f"{where} has no {' and no '.join(missing)}; a WD tagger needs both {_FILES}. "
                           f"Download them, e.g. {download_hint(model, DEFAULT_WD14, _DOWNLOAD)}")


def _providers(device: str | None, available: list[str]) -> list:
    """onnxruntime execution providers for ``device`` (None: the GPU when the GPU build sees one)."""
    cuda = "CUDAExecutionProvider" in available
    if device is None:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return ["CPUExecutionProvider"]
    if kind != "cuda" or (index and not index.isdigit()):
        raise CaptionError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'", kind="config")
    if not cuda:
        raise CaptionError(f"device {device!r} was asked for, but onnxruntime has no CUDA support here; use "
                           "--device cpu, or replace onnxruntime with onnxruntime-gpu", kind="config")
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]


# --------------------------------------------------------------------------
# a tiny random-weight tagger, for tests and the demo


# (name, category, fixed logit or None for a random one). A few fixed ones make every picture show
# the formatting rules: an emoticon, parentheses, a character and a rating that must stay out.
_TINY_TAGS: list[tuple[str, int, float | None]] = [
    ("general", RATING, 6.0), ("sensitive", RATING, None), ("questionable", RATING, None), ("explicit", RATING, -6.0),
    ("long_hair", GENERAL, 6.0), ("^_^", GENERAL, 6.0), ("star_(symbol)", GENERAL, 6.0),
    ("1girl", GENERAL, None), ("solo", GENERAL, None), ("short_hair", GENERAL, None), ("smile", GENERAL, None),
    ("open_mouth", GENERAL, None), ("looking_at_viewer", GENERAL, None), ("blue_eyes", GENERAL, None),
    ("brown_hair", GENERAL, None), ("o_o", GENERAL, None), (">_<", GENERAL, None), ("heart_(symbol)", GENERAL, None),
    ("simple_background", GENERAL, None), ("white_background", GENERAL, None), ("outdoors", GENERAL, None),
    ("sky", GENERAL, None), ("cloud", GENERAL, None), ("tree", GENERAL, None), ("flower", GENERAL, None),
    ("dress", GENERAL, None), ("shirt", GENERAL, None), ("hat", GENERAL, None), ("holding", GENERAL, None),
    ("sitting", GENERAL, None), ("standing", GENERAL, None), ("closed_eyes", GENERAL, None),
    ("blush", GENERAL, None), ("no_humans", GENERAL, None), ("red_theme", GENERAL, None), ("no_tag", GENERAL, -9.0),
    ("hatsune_miku", CHARACTER, 6.0), ("kirisame_marisa", CHARACTER, None), ("tiny_(character)", CHARACTER, None),
    ("hakurei_reimu", CHARACTER, -9.0),
]
_TINY_SIZE = 32


def tiny_tags_csv() -> str:
    """The tiny tagger's ``selected_tags.csv`` (the real files' columns; counts are made up)."""
    lines = ["tag_id,name,category,count"]
    for i, (name, category, _) in enumerate(_TINY_TAGS):
        lines.append(f"{1000 + i},{name},{category},{(len(_TINY_TAGS) - i) * 100}")
    return "\n".join(lines) + "\n"


def build_tiny_tagger(seed: int = 0):
    """A random-weight ONNX tagger: NHWC BGR 0-255 pictures of 32 px -> one sigmoid score per tiny tag.

    Transpose to NCHW, scale to -0.5..0.5, a strided 3x3 conv, ReLU, global
    average pool, a matrix product and a bias, Sigmoid. The random biases
    spread the scores around the default thresholds, so pictures differ in
    their tags and a higher threshold keeps fewer of them.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    n, channels = len(_TINY_TAGS), 8
    # Random logits centred a little below each category's default threshold (0.35 and 0.85).
    centre = {GENERAL: -2.0, CHARACTER: 0.5, RATING: 0.0}
    bias = np.array([centre[category] for _, category, _ in _TINY_TAGS]) + rng.uniform(-2.0, 2.0, n)
    for i, (_, _, fixed) in enumerate(_TINY_TAGS):
        if fixed is not None:
            bias[i] = fixed
    weights = {
        "conv_w": rng.normal(0.0, 0.5, (channels, 3, 3, 3)),
        "conv_b": rng.normal(0.0, 0.1, channels),
        "proj_w": rng.normal(0.0, 3.0, (channels, n)) * [0.0 if t[2] is not None else 1.0 for t in _TINY_TAGS],
        "proj_b": bias,
        "scale": np.array(1.0 / 255.0),
        "half": np.array(0.5),
    }
    initializers = [numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
                    for name, value in weights.items()]
    node = helper.make_node
    nodes = [
        node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        node("Mul", ["nchw", "scale"], ["scaled"]),
        node("Sub", ["scaled", "half"], ["centred"]),
        node("Conv", ["centred", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3], strides=[2, 2],
             pads=[1, 1, 1, 1]),
        node("Relu", ["conv"], ["relu"]),
        node("GlobalAveragePool", ["relu"], ["pooled"]),
        node("Flatten", ["pooled"], ["features"], axis=1),
        node("MatMul", ["features", "proj_w"], ["projected"]),
        node("Add", ["projected", "proj_b"], ["logits"]),
        node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny-wd-tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", _TINY_SIZE, _TINY_SIZE, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lora-studio")
    model.ir_version = 8  # readable by any onnxruntime of the last few years
    onnx.checker.check_model(model)
    return model


def write_tiny_tagger(directory: str | Path, seed: int = 0) -> Path:
    """Write a random-weight tagger folder (``model.onnx`` + ``selected_tags.csv``) and return its path.

    Written to a temporary sibling and renamed into place, so an interrupted
    call never leaves half a tagger behind.
    """
    from core.fsutil import new_folder

    try:
        import onnx
    except ImportError as e:
        raise CaptionError("building the tiny tagger needs the onnx package: pip install onnx",
                           kind="config") from e
    with new_folder(directory) as tmp:
        onnx.save(build_tiny_tagger(seed), str(tmp / MODEL_FILE))
        (tmp / TAGS_FILE).write_text(tiny_tags_csv(), encoding="utf-8")
    return Path(directory)

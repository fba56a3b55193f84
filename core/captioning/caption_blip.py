"""The ``blip`` captioner: BLIP (Salesforce) writes one short English sentence per picture.

Registered in ``core.captioning.caption.CAPTIONERS``; this module (and transformers) is
imported only when a BLIP job runs. ``write_tiny_blip`` builds a tiny
random-weight BLIP offline for tests and the demo (its captions are
gibberish; the code path is the real one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from core.captioning.caption import (
    DEFAULT_BLIP,
    CaptionerBase,
    CaptionError,
    check_all_weights,
    clean_caption,
    load_failure,
    model_source,
    pick_device,
)
from core.quiet import quiet_transformers

if TYPE_CHECKING:
    from PIL import Image


class BlipCaptioner(CaptionerBase):
    """BLIP (Salesforce) image captioning: one short English sentence per picture.

    ``model`` is a local folder or a hub id (default: the base model, about
    1 GB). It runs on the GPU in fp16 when there is one, else on the CPU in
    fp32 (a few seconds per image with the base model). Loading raises
    ``CaptionError`` with what to do, never a bare library traceback.
    """

    @staticmethod
    def write_tiny(directory, seed: int = 0) -> Path:
        return write_tiny_blip(directory, seed)

    name = "blip"
    default_model = DEFAULT_BLIP
    suggested_model = "Salesforce/blip-image-captioning-large"
    default_max_new_tokens = 40

    def __init__(self, model: str = "", device: str | None = None):
        import torch

        self.model_id = model or self.default_model
        self.device = pick_device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        source = model_source(self.model_id, self.default_model)
        self.processor, self.model = self._load(source)
        self.model.to(self.device).eval()

    def _load(self, source: str):
        from transformers import AutoConfig, BlipForConditionalGeneration, BlipProcessor

        what = "a whole BLIP captioning model (config.json, weights, processor and tokenizer files)"
        with quiet_transformers():
            try:
                config = AutoConfig.from_pretrained(source)
                _check_blip_config(config, self.model_id)
                processor = BlipProcessor.from_pretrained(source)
                model, info = BlipForConditionalGeneration.from_pretrained(
                    source, dtype=self.dtype, output_loading_info=True)
            except (OSError, ValueError, KeyError) as e:
                raise CaptionError(load_failure(self.model_id, e, what, self.default_model)) from e
        check_all_weights(info, self.model_id, "a BLIP captioning model", self.default_model)
        return processor, model

    def caption(self, images: list[Image.Image], max_new_tokens: int | None = None) -> list[str]:
        """One cleaned caption per RGB image, in order (greedy decoding)."""
        import torch

        if self.model is None:
            raise CaptionError("this captioner was closed; create a new one", kind="config")
        if not images:
            return []
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        # The decoder starts from one [DEC] token; it cannot write past its position table.
        room = self.model.config.text_config.max_position_embeddings - 1
        wanted = max_new_tokens or self.default_max_new_tokens
        with torch.inference_mode():
            ids = self.model.generate(pixel_values=pixels.to(self.device, self.dtype),
                                      max_new_tokens=max(1, min(wanted, room)))
        return [clean_caption(text) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


def _check_blip_config(config, model: str) -> None:
    """Refuse models that would load with random weights, or not caption at all."""
    kind = getattr(config, "model_type", "")
    if kind != "blip":
        raise CaptionError(f"{model} is a {kind or 'unknown'} model, not BLIP; the 'blip' captioner needs a "
                           f"BLIP captioning model such as {DEFAULT_BLIP} or Salesforce/blip-image-captioning-large")
    architectures = getattr(config, "architectures", None) or []
    if architectures and "BlipForConditionalGeneration" not in architectures:
        raise CaptionError(f"{model} is a BLIP {architectures[0]} model, which does not write captions; use a "
                           f"captioning one such as {DEFAULT_BLIP}")


# --------------------------------------------------------------------------
# a tiny random-weight BLIP, for tests and the demo


_TINY_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # BLIP starts captions with [DEC]
_TINY_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "close", "up", "dog", "cat",
               "man", "woman", "sitting", "standing", "table", "white", "black", "red", "blue", "green"]


def build_tiny_blip(seed: int = 0):
    """A random-weight BLIP captioning model and its processor (a few hundred kB)."""
    # The plain BlipImageProcessor needs torchvision (else it falls back with a warning);
    # the PIL one does the same processing without it, and saves under the same type name.
    import string

    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    letters = list(string.ascii_lowercase + string.digits)
    tokens = list(dict.fromkeys(_TINY_SPECIAL + letters + [f"##{c}" for c in letters] + _TINY_WORDS))
    max_positions = 64
    tokenizer = BertTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, bos_token="[DEC]",
                              model_max_length=max_positions)
    ids = tokenizer.convert_tokens_to_ids
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=32,
                           initializer_range=0.02),  # BLIP's default 1e-10 would make every picture look alike
        text_config=dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=max_positions,
                         # generate() starts from bos ([DEC]) and stops at sep ([SEP]), as the real BLIP does.
                         bos_token_id=ids("[DEC]"), sep_token_id=ids("[SEP]"), eos_token_id=ids("[SEP]"),
                         pad_token_id=ids("[PAD]")),
        projection_dim=32, image_text_hidden_size=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        # Random weights would often emit only special tokens (decoded as ""); make those unlikely,
        # so every caption is some (gibberish) text of max_new_tokens tokens.
        model.text_decoder.cls.predictions.bias[ids(_TINY_SPECIAL)] = -30.0
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    return model, processor


def write_tiny_blip(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random-weight BLIP captioner folder (model + processor) and return its path.

    ``BlipProcessor.from_pretrained`` and ``BlipForConditionalGeneration.from_pretrained``
    load it offline. Written to a temporary sibling and renamed into place,
    so an interrupted call never leaves half a model behind.
    """
    from core.fsutil import new_folder

    with new_folder(directory) as tmp, quiet_transformers():
        model, processor = build_tiny_blip(seed)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(directory)

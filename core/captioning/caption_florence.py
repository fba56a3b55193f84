"""Florence-2 captions: ``python -m core caption DIR --captioner florence2 [--task more-detailed]``.

Florence-2 (Microsoft) is a small vision-language model that writes a
caption of the length its task prompt asks for: ``caption`` (one
sentence), ``detailed`` (a few) or ``more-detailed`` (a paragraph, the
default: what models trained on long natural-language prompts want). It runs
through transformers' own ``Florence2ForConditionalGeneration`` and
``Florence2Processor``, so the model folder is the transformers layout of
the florence-community conversions (``florence-community/Florence-2-base``,
``-large``), not Microsoft's original remote-code repositories.

On the GPU it runs in fp16, on the CPU in fp32; beam search with 3 beams,
as the model was evaluated. ``write_tiny_florence2`` builds a random-weight
model and processor offline, for tests and trying the flow.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.captioning.caption import (
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

DEFAULT_FLORENCE2 = "florence-community/Florence-2-base"
# --task value -> the task prompt Florence-2 was trained with.
TASKS = {"caption": "<CAPTION>", "detailed": "<DETAILED_CAPTION>", "more-detailed": "<MORE_DETAILED_CAPTION>"}
_WHAT = ("a whole Florence-2 model in the transformers layout (config.json, weights, processor and tokenizer "
         "files), such as the florence-community conversions; Microsoft's original remote-code repositories "
         "do not load natively")
_NUM_BEAMS = 3


class Florence2Captioner(CaptionerBase):
    """Florence-2 image captioning: a sentence, a few, or a paragraph per picture (``task``).

    ``model`` is a local folder or a hub id (default: the base model, about
    0.5 GB; ``florence-community/Florence-2-large`` writes better captions).
    Loading raises ``CaptionError`` with what to do, never a bare library traceback.
    """

    @staticmethod
    def write_tiny(directory, seed: int = 0) -> Path:
        return write_tiny_florence2(directory, seed)

    name = "florence2"
    default_model = DEFAULT_FLORENCE2
    suggested_model = "florence-community/Florence-2-large"
    options = {"task": "more-detailed"}
    default_max_new_tokens = 256  # a "more detailed" paragraph stays well under it

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        options = super().check_options(options)
        if options["task"] not in TASKS:
            raise CaptionError(f"unknown Florence-2 task {options['task']!r}; choose one of: {', '.join(TASKS)}",
                               kind="config")
        return options

    def __init__(self, model: str = "", device: str | None = None, task: str = "more-detailed"):
        import torch

        self.task_prompt = TASKS[self.check_options({"task": task})["task"]]
        self.model_id = model or self.default_model
        self.device = pick_device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.processor, self.model = self._load(model_source(self.model_id, self.default_model))
        self.model.to(self.device).eval()

    def _load(self, source: str):
        from transformers import AutoConfig, Florence2ForConditionalGeneration, Florence2Processor

        with quiet_transformers():
            try:
                config = AutoConfig.from_pretrained(source)
                _check_config(config, self.model_id)
                processor = Florence2Processor.from_pretrained(source)
                model, info = Florence2ForConditionalGeneration.from_pretrained(
                    source, dtype=self.dtype, output_loading_info=True)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                # TypeError/AttributeError: a processor or config written for another layout (remote code).
                raise CaptionError(load_failure(self.model_id, e, _WHAT, self.default_model)) from e
        check_all_weights(info, self.model_id, "a Florence-2 model in the transformers layout", self.default_model)
        return processor, model

    def caption(self, images: list[Image.Image], max_new_tokens: int | None = None) -> list[str]:
        """One cleaned caption per RGB image, in order."""
        import torch

        if self.model is None:
            raise CaptionError("this captioner was closed; create a new one", kind="config")
        if not images:
            return []
        inputs = self.processor(text=[self.task_prompt] * len(images), images=list(images), return_tensors="pt")
        # The decoder cannot write past its position table.
        room = self.model.config.text_config.max_position_embeddings - 2
        wanted = max(1, min(max_new_tokens or self.default_max_new_tokens, room))
        with torch.inference_mode():
            ids = self.model.generate(input_ids=inputs["input_ids"].to(self.device),
                                      attention_mask=inputs["attention_mask"].to(self.device),
                                      pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                                      max_new_tokens=wanted, num_beams=_NUM_BEAMS, do_sample=False)
        return [clean_caption(text) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


def _check_config(config, model: str) -> None:
    """Refuse what is not a transformers-layout Florence-2 (it would load with random weights, or not at all)."""
    kind = getattr(config, "model_type", "")
    if kind != "florence2":
        raise CaptionError(f"{model} is a {kind or 'unknown'} model, not Florence-2; the 'florence2' captioner "
                           f"needs a Florence-2 model such as {DEFAULT_FLORENCE2} or "
                           "florence-community/Florence-2-large")
    vision = getattr(config, "vision_config", None)
    if getattr(vision, "model_type", "florence_vision") != "florence_vision":
        raise CaptionError(f"{model} is a Florence-2 model in Microsoft's original remote-code layout, which "
                           f"transformers does not load natively; use the converted one instead, e.g. "
                           f"{DEFAULT_FLORENCE2} or florence-community/Florence-2-large")


# --------------------------------------------------------------------------
# a tiny random-weight Florence-2, for tests and the demo


_TINY_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]
_TINY_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "is", "photo", "picture", "image", "shown", "what",
               "describe", "Describe", "paragraph", "detail", "does", "dog", "cat", "man", "woman", "sitting",
               "standing", "table", "white", "black", "red", "blue", "green"]
_TINY_SIZE = 64  # two stages of stride 4 and 2: an 8x8 feature map, 64 image tokens + 1


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer in the Florence-2 (BART) layout, built in memory, with an <image> token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import BartTokenizer

    tokens = _TINY_SPECIAL + sorted(ByteLevel.alphabet())
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        for form in (word, "\u0120" + word):  # \u0120 (Ġ) marks a word that follows a space
            current = form[0]
            for char in form[1:]:
                if (current, char) not in merges:
                    merges.append((current, char))
                current += char
                if current not in tokens:
                    tokens.append(current)
    tokens += ["<mask>", "<image>"]
    return BartTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges, model_max_length=1024,
                         extra_special_tokens={"image_token": "<image>"})


def build_tiny_florence2(seed: int = 0):
    """A random-weight Florence-2 (two small DaViT stages, a one-layer BART) and its processor."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    tokenizer = build_tiny_tokenizer()
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id, "decoder_start_token_id": tokenizer.eos_token_id}
    config = Florence2Config(
        vision_config=dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                           patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4],
                           window_size=4, projection_dim=32, max_position_embeddings=16,
                           max_temporal_embeddings=4, drop_path_rate=0.0),
        text_config=dict(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                         decoder_ffn_dim=37, max_position_embeddings=1024, **special),
        image_token_id=tokenizer.image_token_id,
    )
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    # Random weights would often end at once, or emit bytes that are not letters: allow only words and
    # ASCII letters, so every caption is some (gibberish) text of max_new_tokens tokens.
    model.generation_config.forced_eos_token_id = None  # it would force a suppressed token
    model.generation_config.suppress_tokens = sorted(
        i for tok, i in tokenizer.get_vocab().items() if not _is_ascii_word(tok.removeprefix("\u0120")))
    side = {"height": _TINY_SIZE, "width": _TINY_SIZE}
    # The PIL image processor does what the torchvision one does, without needing torchvision.
    image_processor = CLIPImageProcessorPil(size=side, crop_size=side, do_center_crop=False,
                                            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                            image_seq_length=(_TINY_SIZE // 8) ** 2 + 1)
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def _is_ascii_word(token: str) -> bool:
    return token.isascii() and token.isalpha()


def write_tiny_florence2(directory: str | Path, seed: int = 0) -> Path:
    """Write a random-weight Florence-2 folder (model + processor) and return its path.

    ``Florence2Processor.from_pretrained`` and ``Florence2ForConditionalGeneration.from_pretrained``
    load it offline. Written to a temporary sibling and renamed into place.
    """
    from core.fsutil import new_folder

    with new_folder(directory) as tmp, quiet_transformers():
        model, processor = build_tiny_florence2(seed)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(directory)

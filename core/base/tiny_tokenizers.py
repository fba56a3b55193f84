"""Tokenizers built in code (no files, no downloads) for the tiny test and demo models."""

from __future__ import annotations

# Words the in-code tokenizer knows as whole tokens; everything else is
# spelled out byte by byte, which is enough for prompts in tests.
WORDS = ("a", "photo", "of", "sks", "dog", "cat", "the", "in", "painting", "style", "person")
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def build_tokenizer(model_max_length: int = 77):
    """A byte-level CLIP BPE tokenizer built in memory (no files needed)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens = list(alphabet) + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            merge = (current, symbol)
            if merge not in merges:
                merges.append(merge)
            current += symbol
            if current not in tokens:
                tokens.append(current)
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_t5_tokenizer(model_max_length: int = 512):
    """A T5 (unigram) tokenizer in memory: <pad> 0, </s> 1, <unk> 2, a few whole words, then characters.

    ``extra_ids=0`` leaves out T5's 100 sentinel tokens; size the encoder's vocabulary with ``len()``.
    """
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -3.0 - 0.01 * i) for i, word in enumerate(WORDS)]
    pieces += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# Qwen3's chat template, reduced to what the pipelines use: one user turn and the generation prompt, with
# the empty think block that ``enable_thinking=False`` adds (as the real template does).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def build_qwen_tokenizer(model_max_length: int = 1024):
    """A byte-level BPE Qwen2 tokenizer (what Qwen3 models use) in memory, with its special tokens and chat
    template. Byte-level spaces are "Ġ": " photo" is one token "Ġphoto"."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    tokens = sorted(ByteLevel.alphabet())
    merges: list[tuple[str, str]] = []
    for word in [w for x in WORDS for w in (x, "\u0120" + x)] + ["user", "assistant"]:
        current = word[0]
        for symbol in word[1:]:
            if (current, symbol) not in merges:
                merges.append((current, symbol))
            current += symbol
            if current not in tokens:
                tokens.append(current)
    special, think = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>"]
    tokens += special + think
    tokenizer = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=model_max_length)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in think])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE  # saved as chat_template.jinja
    return tokenizer

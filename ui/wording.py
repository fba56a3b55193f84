"""The engine's messages in the app's words.

The engine's errors and advice are written for both ways in (they are printed by ``python -m core`` too),
so some name command-line options. In the app those read as if it were broken ("pass --resume"); this
table says the same with the app's buttons. Messages not listed pass unchanged.
"""

from __future__ import annotations

import re

# (pattern, the app's words), applied in order.
APP_WORDS = [
    (r"pass --resume to continue it", "resume it under Past runs to continue it"),
    (r"--resume continues", "Resume (under Past runs) continues"),
    (r"continue with --resume", "continue with Resume under Past runs"),
    (r" ?\(python -m core plan CONFIG --fit\)", ""),
    (r"python -m core plan CONFIG --fit picks settings", "'Fit my GPU' in the Train tab picks settings"),
    (r"lower --threshold", "lower the threshold"),
    (r"--character-threshold", "the character threshold"),
    (r"--threshold", "the threshold"),
]


def in_app_words(text: str) -> str:
    for pattern, words in APP_WORDS:
        text = re.sub(pattern, words, text)
    return text

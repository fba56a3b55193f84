"""Timers that send only what changed.

The Train tab's timer asks for the live run's view every second: progress, loss plot, samples, log. Sent
whole each time, the browser redraws the plot and the gallery every second, for as long as the page is
open, which costs a CPU core's worth of drawing while a run trains on the same machine. ``SentBefore``
remembers, per page (gradio's session hash), a digest of what each output was last sent, and replaces an
unchanged value with ``gr.skip()``. A page's first call (its load) and any call after ``forget`` send
everything.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
from collections import OrderedDict
from typing import Any


class SentBefore:
    def __init__(self, pages: int = 64):
        self._sent: OrderedDict[str, list[bytes | None]] = OrderedDict()
        self._pages = pages  # pages remembered (the oldest forgotten first)
        self._lock = threading.Lock()

    def only_changed(self, request, values: tuple) -> tuple:
        """``values`` with those this page was last sent replaced by ``gr.skip()``."""
        import gradio as gr

        key = getattr(request, "session_hash", None)
        if not key:
            return values
        digests = [_digest(value) for value in values]
        with self._lock:
            before = self._sent.pop(key, None)
            self._sent[key] = digests
            while len(self._sent) > self._pages:
                self._sent.popitem(last=False)
        if before is None or len(before) != len(values):
            return values
        return tuple(gr.skip() if new is not None and new == old else value
                     for value, old, new in zip(values, before, digests, strict=True))

    def forget(self, request) -> None:
        """The page shows something else now (another run opened): its next call sends everything."""
        key = getattr(request, "session_hash", None)
        with self._lock:
            self._sent.pop(key, None)


def _digest(value: Any) -> bytes | None:
    """A digest of a value as gradio would send it; None (always sent) for what cannot be pickled."""
    try:
        return hashlib.blake2b(pickle.dumps(value), digest_size=16).digest()
    except Exception:  # noqa: BLE001 - an unpicklable value is simply always sent
        return None

"""The real app as a subprocess (``python launch.py --no-browser``) for the tests that talk to it over HTTP."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(home: Path, *args: str, env: dict | None = None, prefix: list[str] | None = None,
                timeout: float = 300, unset: tuple[str, ...] = ()) -> Iterator[dict]:
    """Start the app on a free port with ``LORA_STUDIO_HOME=home``; yield {"url", "port", "proc", "output"}.

    ``prefix`` runs it under another program (``strace ...``); ``unset`` names variables of this
    process's environment the app must not inherit. The app's output is
    collected in the background (``output``, a list of lines) so its pipe never fills.
    """
    port = free_port()
    full_env = {**{k: v for k, v in os.environ.items() if k not in unset}, "LORA_STUDIO_HOME": str(home),
                "PYTHONPATH": str(ROOT), **(env or {})}
    started = time.time()
    proc = subprocess.Popen([*(prefix or []), sys.executable, "launch.py", "--no-browser", "--port", str(port),
                             *args], cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    output: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            match = re.search(r"running at (http://\S+)", line)
            if match and not url:
                url.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        ready.wait(timeout)
        assert url, "the app never printed its address:\n" + "".join(output[-30:])
        yield {"url": url[0], "port": port, "proc": proc, "output": output, "started": started}
    finally:
        _signal_group(proc, signal.SIGTERM)  # the app and whatever it runs under (strace)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=30)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
    else:
        proc.kill()

"""The real app as a subprocess (``python launch.py --no-browser``) for the tests that talk to it over HTTP."""

from __future__ import annotations

import contextlib
import http.client
import json
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


def request(port: int, method: str, path: str, host: str | None = None, origin: str | None = None,
            body: bytes | None = None, headers: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    """One HTTP request to the app with every header chosen here (Host and Origin included)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", f"127.0.0.1:{port}" if host is None else host)
        if origin is not None:
            conn.putheader("Origin", origin)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body or b"")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def multipart(name: str, data: bytes, more: list[tuple[str, bytes]] = ()) -> tuple[bytes, dict]:
    """A multipart body of one or more files, as the page uploads them."""
    boundary = "----lora-studio-test"
    body = b""
    for file_name, content in [(name, data), *more]:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{file_name}\"\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def join_body(fn_index: int, data: list, session: str = "testsession") -> bytes:
    """The body the app's own page posts to run an event handler through the queue."""
    return json.dumps({"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None,
                       "trigger_id": None}).encode()


def handler_inputs(config: dict, api_name: str, values: dict) -> tuple[int, list]:
    """(fn index, data) to run a handler through the queue, its inputs given by elem_id; an input not
    given keeps the value the page starts with."""
    dependency = next(d for d in config["dependencies"] if d["api_name"] == api_name)
    components = {c["id"]: c.get("props", {}) for c in config["components"]}
    data = [values.get(components[cid].get("elem_id"), components[cid].get("value")) for cid in dependency["inputs"]]
    return dependency["id"], data


def call(port: int, fn_index: int, data: list, session: str, timeout: float = 300) -> tuple[int, list[dict]]:
    """Run one event handler through the queue as the app's page does; (HTTP status, the stream's messages)."""
    own = f"http://127.0.0.1:{port}"
    status, _ = request(port, "POST", "/gradio_api/queue/join", origin=own,
                        body=join_body(fn_index, data, session), headers={"Content-Type": "application/json"},
                        timeout=timeout)
    if status != 200:
        return status, []
    status, stream = request(port, "GET", f"/gradio_api/queue/data?session_hash={session}", timeout=timeout)
    messages = [json.loads(line[5:]) for line in stream.decode("utf-8").splitlines() if line.startswith("data:")]
    return status, messages


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


def drive_load(port: int, fn: dict[str, int], dataset: str, pictures: list[Path], calls: int = 50,
               drops: int = 3, workers: int = 16) -> dict[str, list[tuple[float, bool]]]:
    """What a busy user (or several tabs) does at once: drop ``pictures`` into ``dataset`` in ``drops`` drops
    (uploaded ten files a request, then imported by the Dataset tab's handler) while ``calls`` other
    handlers run concurrently (the gallery listing, the Train tab's poll, the Prompt tab's lists).

    Returns {"drop": [...], "on_pick": [...], ...}: (seconds, succeeded) per request.
    """
    from concurrent.futures import ThreadPoolExecutor

    def done(messages: list[dict]) -> bool:
        return any(m.get("msg") == "process_completed" and m.get("success") for m in messages)

    def drop(batch: list[Path], i: int) -> tuple[str, float, bool]:
        started = time.perf_counter()
        uploaded: list[str] = []
        for at in range(0, len(batch), 10):
            chunk = batch[at: at + 10]
            body, headers = multipart(chunk[0].name, chunk[0].read_bytes(),
                                      [(p.name, p.read_bytes()) for p in chunk[1:]])
            status, answer = request(port, "POST", "/gradio_api/upload", origin=f"http://127.0.0.1:{port}",
                                     body=body, headers=headers, timeout=300)
            if status != 200:
                return "drop", time.perf_counter() - started, False
            uploaded += json.loads(answer)
        files = [{"path": path, "orig_name": src.name, "meta": {"_type": "gradio.FileData"}}
                 for path, src in zip(uploaded, batch, strict=True)]
        status, messages = call(port, fn["on_upload"], [dataset, "(top level)", files], f"drop-{i}")
        return "drop", time.perf_counter() - started, status == 200 and done(messages)

    handlers = [("on_pick", [dataset]), ("on_tick", []), ("on_refresh", [])]

    def handler(i: int) -> tuple[str, float, bool]:
        name, data = handlers[i % len(handlers)]
        started = time.perf_counter()
        status, messages = call(port, fn[name], data, f"call-{i}")
        return name, time.perf_counter() - started, status == 200 and done(messages)

    size = -(-len(pictures) // drops)
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(drop, pictures[at: at + size], i) for i, at in enumerate(range(0, len(pictures), size))]
        futures += [pool.submit(handler, i) for i in range(calls)]
        results: dict[str, list[tuple[float, bool]]] = {}
        for future in futures:
            kind, seconds, ok = future.result()
            results.setdefault(kind, []).append((seconds, ok))
    return results

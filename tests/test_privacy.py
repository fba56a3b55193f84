"""Nothing leaves the computer: the app, with a pipeline loaded and an image generated, connects to nothing but
itself (recorded with strace), and onnxruntime's telemetry is off in every process that imports it."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from core.privacy import ENVIRONMENT
from tests.app_server import ROOT, handler_inputs, join_body, request, running_app

ADDRESS = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"')


def _strace_works() -> bool:
    if not shutil.which("strace"):
        return False
    return subprocess.run(["strace", "-f", "-qq", "-e", "trace=none", "true"], capture_output=True).returncode == 0


def outgoing_addresses(log: str) -> list[str]:
    """Every IP address the traced processes connected or sent datagrams to."""
    found = []
    for line in log.splitlines():
        if re.search(r"\b(connect|sendto|sendmsg|sendmmsg)\(", line):
            found += [a or b for a, b in ADDRESS.findall(line)]
    return found


def test_outgoing_addresses_are_read_from_strace_lines():
    log = ('123 connect(5, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.0.0.53")}, 16) = 0\n'
           '124 connect(7, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), '
           'inet_pton(AF_INET6, "2603:1061::1", &sin6_addr), sin6_scope_id=0}, 28) = -1 EINPROGRESS\n'
           '125 connect(3, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT\n')
    assert outgoing_addresses(log) == ["10.0.0.53", "2603:1061::1"]


@pytest.mark.skipif(not _strace_works(), reason="needs strace that may trace child processes")
def test_the_app_connects_to_nothing_but_itself(tmp_path):
    from core.base.tiny import write_tiny_model

    home = tmp_path / "home"
    model = write_tiny_model(home / "models" / "tiny")
    log = tmp_path / "strace.log"
    trace = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-o", str(log)]
    # The app must switch everything off itself: none of the tests' opt-out variables are passed on.
    with running_app(home, prefix=trace, unset=tuple(ENVIRONMENT)) as app:
        port = app["port"]
        config = json.loads(request(port, "GET", "/config")[1])
        # The Prompt tab's Generate: load the pipeline, make an image.
        fn, inputs = handler_inputs(config, "on_generate", {
            "prompt-model": str(model), "prompt-lora": None, "prompt-text": "a photo of sks", "prompt-steps": 2,
            "prompt-width": 64, "prompt-height": 64})
        status, _ = request(port, "POST", "/gradio_api/queue/join", origin=f"http://127.0.0.1:{port}",
                            body=join_body(fn, inputs), headers={"Content-Type": "application/json"})
        assert status == 200
        status, stream = request(port, "GET", "/gradio_api/queue/data?session_hash=testsession")
        assert status == 200 and b"process_completed" in stream and b"Generated with" in stream, stream[-2000:]
        time.sleep(5)  # anything a library starts in the background once a pipeline is loaded
    text = log.read_text()
    assert "connect(" in text  # the trace saw the app's own connections (it checks its address at start)
    addresses = outgoing_addresses(text)
    outside = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback
               and not ipaddress.ip_address(a.split("%")[0]).is_unspecified]
    assert not outside, f"connections to {sorted(set(outside))}"
    print(f"{len(addresses)} connection(s) traced, all to this computer")


@pytest.mark.slow  # 15 s of waiting; the app test above already fails if the app leaves telemetry on
@pytest.mark.skipif(not _strace_works(), reason="needs strace that may trace child processes")
def test_onnxruntime_telemetry_is_off_in_the_engines_processes(tmp_path):
    """diffusers imports onnxruntime when a pipeline is saved or loaded; a few seconds later onnxruntime starts
    resolving its telemetry host, unless no_telemetry() ran first. Both cases side by side (the control shows the
    trace sees the lookups)."""
    import os

    code = ("import sys, time\n"
            "if sys.argv[1] == 'quiet':\n"
            "    from core.privacy import no_telemetry\n"
            "    no_telemetry()\n"
            "from diffusers.pipelines import onnx_utils\n"
            "time.sleep(14)\n")
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
    procs = {}
    for case in ("quiet", "control"):
        log = tmp_path / f"{case}.log"
        trace = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect,sendto", "-o", str(log)]
        procs[case] = (log, subprocess.Popen([*trace, sys.executable, "-c", code, case], cwd=ROOT, env=env,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    outside = {}
    for case, (log, proc) in procs.items():
        assert proc.wait(timeout=120) == 0
        outside[case] = [a for a in outgoing_addresses(log.read_text()) if not ipaddress.ip_address(a).is_loopback]
    assert outside["control"], "without no_telemetry() the trace should see onnxruntime's lookups"
    assert outside["quiet"] == []

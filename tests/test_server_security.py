"""The app's server against a web page that tries to drive it: foreign Host (DNS rebinding), foreign Origin
(cross-site requests), files outside what the pages show, oversized uploads.

One real server (``python launch.py``) with a home laid out like the project folder (the served root when
LORA_STUDIO_HOME is not set), requests made with http.client so that every header is ours to choose.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.app_server import ROOT, join_body, multipart, request, running_app
from tests.conftest import write_dataset
from ui.guard import HostPolicy, split_host

FOREIGN_HOSTS = ["evil.example:{port}", "127.0.0.1.evil.example:{port}", "localhost:{other}", "192.168.1.20:{port}",
                 "", "127.0.0.1:{port}@evil.example"]
FOREIGN_ORIGINS = ["http://evil.example", "http://127.0.0.1:{other}", "null", "https://127.0.0.1:{port}.evil.example"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app with a home holding what must never be served, beside what the pages show."""
    home = tmp_path_factory.mktemp("project")
    (home / ".git").mkdir()
    (home / ".git" / "config").write_text("[remote]\n\turl = secret\n")
    (home / "requirements.txt").write_text("torch\n")
    write_dataset(home / "datasets" / "pets", n=2)
    outside = tmp_path_factory.mktemp("outside") / "private.png"
    write_dataset(outside.parent / "x", n=1)
    next((outside.parent / "x").glob("*.png")).rename(outside)
    (home / "datasets" / "pets" / "linked.png").symlink_to(outside)
    (home / "outputs" / ".app").mkdir(parents=True)
    (home / "outputs" / ".app" / "job.log").write_text("the app's own log\n")
    (home / "outputs" / "run" / "samples").mkdir(parents=True)
    sample = next((home / "datasets" / "pets").glob("img1.png"))
    (home / "outputs" / "run" / "samples" / "step000003-00.png").write_bytes(sample.read_bytes())
    uploads = tmp_path_factory.mktemp("gradio-uploads")
    with running_app(home, env={"GRADIO_TEMP_DIR": str(uploads)}) as server:
        config = json.loads(request(server["port"], "GET", "/config")[1])
        server["fn"] = {d["api_name"]: d["id"] for d in config["dependencies"]}
        yield {**server, "home": home, "outside": outside, "uploads": uploads}


def file_path(path: Path) -> str:
    return "/gradio_api/file=" + str(path)


def test_foreign_host_is_refused_everywhere(app):
    port, home = app["port"], app["home"]
    picture = home / "datasets" / "pets" / "img1.png"
    upload, upload_headers = multipart("a.png", picture.read_bytes())
    create = join_body(app["fn"]["on_create"], ["made-by-a-web-page"])
    for template in FOREIGN_HOSTS:
        host = template.format(port=port, other=port + 1)
        assert request(port, "GET", "/", host=host)[0] == 403, host
        assert request(port, "GET", "/config", host=host)[0] == 403, host
        assert request(port, "GET", file_path(picture), host=host)[0] == 403, host
        assert request(port, "POST", "/gradio_api/upload", host=host, body=upload, headers=upload_headers)[0] == 403
        assert request(port, "POST", "/gradio_api/queue/join", host=host, body=create,
                       headers={"Content-Type": "application/json"})[0] == 403, host
    time.sleep(1.0)
    assert not (home / "datasets" / "made-by-a-web-page").exists()


def test_foreign_origin_is_refused(app):
    port, home = app["port"], app["home"]
    picture = home / "datasets" / "pets" / "img1.png"
    upload, upload_headers = multipart("a.png", picture.read_bytes())
    create = join_body(app["fn"]["on_create"], ["made-by-another-site"])
    for template in FOREIGN_ORIGINS:
        origin = template.format(port=port, other=port + 1)
        assert request(port, "POST", "/gradio_api/upload", origin=origin, body=upload,
                       headers=upload_headers)[0] == 403, origin
        assert request(port, "POST", "/gradio_api/queue/join", origin=origin, body=create,
                       headers={"Content-Type": "application/json"})[0] == 403, origin
        assert request(port, "GET", file_path(picture), origin=origin)[0] == 403, origin
    # A page of another site embedding a picture (no Origin on a plain <img>, but the browser says cross-site).
    assert request(port, "GET", file_path(picture), headers={"Sec-Fetch-Site": "cross-site",
                                                             "Sec-Fetch-Mode": "no-cors"})[0] == 403
    time.sleep(1.0)
    assert not (home / "datasets" / "made-by-another-site").exists()


def test_the_apps_own_requests_work(app):
    port, home = app["port"], app["home"]
    own = f"http://127.0.0.1:{port}"
    picture = home / "datasets" / "pets" / "img1.png"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert request(port, "GET", "/", host=host)[0] == 200, host
    assert request(port, "GET", file_path(picture), origin=own)[0] == 200
    # A link to the app from elsewhere still opens it (a top-level navigation).
    assert request(port, "GET", "/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})[0] == 200
    status, body = request(port, "POST", "/gradio_api/upload", origin=own,
                           headers=multipart("a.png", picture.read_bytes())[1],
                           body=multipart("a.png", picture.read_bytes())[0])
    assert status == 200 and json.loads(body)[0].endswith("a.png")
    # An API call through the queue, as the page makes it: the dataset is created.
    status, _ = request(port, "POST", "/gradio_api/queue/join", origin=own,
                        body=join_body(app["fn"]["on_create"], ["made-by-the-app"]),
                        headers={"Content-Type": "application/json"})
    assert status == 200
    status, stream = request(port, "GET", "/gradio_api/queue/data?session_hash=testsession")
    assert status == 200 and b"process_completed" in stream
    assert (home / "datasets" / "made-by-the-app").is_dir()


def test_only_what_the_pages_show_is_served(app):
    port, home = app["port"], app["home"]
    refused = [home / ".git" / "config", home / "requirements.txt", home / "outputs" / ".app" / "job.log",
               home / "datasets" / "pets" / "linked.png", app["outside"], ROOT / ".git" / "config",
               ROOT / "requirements.txt", ROOT / "launch.py"]
    for path in refused:
        assert path.exists(), path
        assert request(port, "GET", file_path(path))[0] == 403, path
    served = [home / "datasets" / "pets" / "img1.png", home / "outputs" / "run" / "samples" / "step000003-00.png"]
    for path in served:
        status, body = request(port, "GET", file_path(path))
        assert status == 200 and body == path.read_bytes(), path


def test_uploads_over_the_limit_are_refused(app):
    from ui.server import MAX_UPLOAD_MB

    port = app["port"]
    body, headers = multipart("huge.png", b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 1024))
    status, message = request(port, "POST", "/gradio_api/upload", body=body, headers=headers)
    assert status == 413, message
    assert not list(app["uploads"].rglob("huge.png"))


def test_uploaded_copies_are_removed_once_imported(app):
    """A picture dropped into the Dataset tab: the dataset keeps a copy, Gradio's temporary one goes."""
    port, home, uploads = app["port"], app["home"], app["uploads"]
    own = f"http://127.0.0.1:{port}"
    picture = next(write_dataset(app["uploads"].parent / "drop", n=1, seed=11).glob("*.png"))
    body, headers = multipart("dropped picture.png", picture.read_bytes())
    status, answer = request(port, "POST", "/gradio_api/upload", origin=own, body=body, headers=headers)
    assert status == 200
    temp = Path(json.loads(answer)[0])
    assert temp.is_file() and temp.resolve().is_relative_to(uploads.resolve())
    file_data = {"path": str(temp), "orig_name": "dropped picture.png", "meta": {"_type": "gradio.FileData"}}
    status, _ = request(port, "POST", "/gradio_api/queue/join", origin=own,
                        body=join_body(app["fn"]["on_upload"], ["pets", "(top level)", [file_data]]),
                        headers={"Content-Type": "application/json"})
    assert status == 200
    status, stream = request(port, "GET", "/gradio_api/queue/data?session_hash=testsession")
    assert status == 200 and b"process_completed" in stream
    stored = home / "datasets" / "pets" / "dropped picture.png"
    assert stored.read_bytes() == picture.read_bytes()
    assert not temp.exists()
    # Nothing of the picture is left in Gradio's folder: not the upload, not a copy made to show it.
    assert not [p for p in uploads.rglob("*") if p.is_file() and p.read_bytes() == picture.read_bytes()]
    assert os.stat(stored).st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------ the rule itself


@pytest.mark.parametrize(("method", "host", "origin", "site", "mode", "allowed"), [
    ("GET", "127.0.0.1:7860", None, None, None, True),
    ("GET", "localhost:7860", None, "none", "navigate", True),
    ("GET", "[::1]:7860", None, None, None, True),
    ("POST", "127.0.0.1:7860", "http://127.0.0.1:7860", "same-origin", "cors", True),
    ("POST", "localhost:7860", "http://localhost:7860", "same-origin", "cors", True),
    ("GET", "127.0.0.1:7860", None, "cross-site", "navigate", True),  # a link to the app
    ("GET", "evil.example:7860", None, None, None, False),  # DNS rebinding
    ("POST", "evil.example:7860", "http://evil.example:7860", "same-origin", "cors", False),
    ("GET", "127.0.0.1:7861", None, None, None, False),
    ("GET", "127.0.0.1", None, None, None, False),
    ("GET", None, None, None, None, False),
    ("GET", "127.0.0.1:7860:7860", None, None, None, False),
    ("POST", "127.0.0.1:7860", "http://evil.example", "cross-site", "cors", False),
    ("POST", "127.0.0.1:7860", "http://localhost:7860", "same-site", "cors", False),  # not the address used
    ("POST", "127.0.0.1:7860", "http://127.0.0.1:8000", "same-site", "cors", False),  # another local server
    ("POST", "127.0.0.1:7860", "null", "cross-site", "cors", False),
    ("GET", "127.0.0.1:7860", None, "cross-site", "no-cors", False),  # <img src> on another site
    ("POST", "127.0.0.1:7860", None, "cross-site", "no-cors", False),  # a form posted from another site
    ("WEBSOCKET", "127.0.0.1:7860", "http://evil.example", None, None, False),
    ("GET", "192.168.1.20:7860", None, None, None, False),  # another computer: only with --listen
])
def test_host_policy(method, host, origin, site, mode, allowed):
    policy = HostPolicy(7860)
    assert (policy.refusal(method, host, origin, site, mode) is None) == allowed


def test_host_policy_with_listen_and_extra_names():
    policy = HostPolicy(7860, listen=True)
    assert policy.refusal("GET", "192.168.1.20:7860") is None
    assert policy.refusal("POST", "192.168.1.20:7860", "http://192.168.1.20:7860") is None
    assert policy.refusal("POST", "192.168.1.20:7860", "http://192.168.1.99:7860") is not None
    assert policy.refusal("GET", "my-pc.local:7860") is not None  # a name can be rebound: only when allowed
    policy.allow("my-pc.local", 7860)
    assert policy.refusal("GET", "my-pc.local:7860") is None
    policy.allow("abc123.gradio.live")  # a --share link: the tunnel's host, no port
    assert policy.refusal("POST", "abc123.gradio.live", "https://abc123.gradio.live") is None
    assert split_host("[::1]:7860") == ("::1", 7860) and split_host("::1:7860") is None

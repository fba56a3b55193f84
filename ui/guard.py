"""Who may talk to the app's server: the app's own pages, never another web site.

The app serves on 127.0.0.1, but "only this computer" is not the same as "only
this app": every web page the user opens runs on this computer too. Two attacks
reach a local server from a browser:

- **DNS rebinding.** A page at ``evil.example`` re-points its own name to
  127.0.0.1; the browser then treats the app as part of that site, so the page
  can call the API and read the answers. Its requests carry
  ``Host: evil.example:PORT``. Refusing every ``Host`` that is not one of the
  app's own names stops it.
- **Cross-site requests.** A page can send requests to ``127.0.0.1:PORT``
  (a form post, a fetch) even when it cannot read the answer; they carry that
  page's ``Origin`` (and ``Sec-Fetch-Site: cross-site``). A request whose
  ``Origin`` is not the address it was sent to is refused, so no site can
  create datasets, upload files or start runs.

``HostPolicy`` is the rule (plain Python, tested on its own); ``RequestGuard``
applies it to every HTTP and websocket request as ASGI middleware, before
Gradio sees it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def split_host(value: str) -> tuple[str, int | None] | None:
    """``"name:port"`` / ``"[::1]:port"`` / ``"name"`` -> (lower-case name, port or None); None if malformed."""
    value = value.strip().lower()
    if not value or any(c.isspace() or c in "/@?#\\" for c in value):
        return None
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        name, colon, port = value.rpartition(":") if ":" in value else (value, "", None)
        if ":" in name:  # an unbracketed IPv6 address is not a valid Host
            return None
    if port is None or port == "":
        return (name, None) if port is None else None
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return name, int(port)


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass
class HostPolicy:
    """The host names and port under which the app answers.

    ``port`` is the app's port. Loopback names are always allowed at that
    port. ``listen`` (the ``--listen`` option) also allows any IP address
    at that port: a page can only reach the app under an IP address by being
    served from it, so IP literals cannot be rebound; host names of the
    machine must be added with ``allow`` (``--allow-host``). ``allow`` also
    takes the public host of a ``--share`` link (port None: the tunnel's).
    """

    port: int
    listen: bool = False
    extra: set[tuple[str, int | None]] = field(default_factory=set)

    def allow(self, name: str, port: int | None = None) -> None:
        self.extra.add((name.strip().strip("[]").lower(), port))

    def host_allowed(self, host: tuple[str, int | None]) -> bool:
        name, port = host
        if (name, port) in self.extra:
            return True
        if port != self.port:
            return False
        return name in LOOPBACK_NAMES or (self.listen and is_ip_literal(name))

    def refusal(self, method: str, host: str | None, origin: str | None = None,
                fetch_site: str | None = None, fetch_mode: str | None = None) -> str | None:
        """Why a request must be refused, or None to let it through.

        ``host``, ``origin``, ``fetch_site`` and ``fetch_mode`` are the raw
        ``Host``, ``Origin``, ``Sec-Fetch-Site`` and ``Sec-Fetch-Mode`` headers.
        """
        parsed = split_host(host or "")
        if parsed is None or not self.host_allowed(parsed):
            return (f"Host {host!r} is not this app's address; open the app at "
                    f"http://127.0.0.1:{self.port}")
        if origin is not None and not same_origin(origin, parsed):
            return f"requests from {origin!r} are not accepted: only the app's own pages may use it"
        if (fetch_site or "").lower() == "cross-site" and (fetch_mode or "").lower() != "navigate":
            # A page of another site embedding or posting to the app (a plain link to it is fine).
            return "requests from another web site are not accepted: only the app's own pages may use it"
        return None


def same_origin(origin: str, host: tuple[str, int | None]) -> bool:
    """True if ``origin`` (``scheme://name[:port]``) names the address the request was sent to."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return False
    return (parts.hostname.lower(), port) == host


class RequestGuard:
    """ASGI middleware: refuse requests that ``HostPolicy`` refuses (HTTP 403, websocket close 1008)."""

    def __init__(self, app, policy: HostPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan events
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        reason = self.policy.refusal(method, headers.get("host"), headers.get("origin"),
                                     headers.get("sec-fetch-site"), headers.get("sec-fetch-mode"))
        if reason is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
        else:
            body = f"refused: {reason}\n".encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

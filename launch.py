"""Start LoRA Studio: python launch.py [--port N] [--listen [--auth user:password]] [--share] [--no-browser]

Serves the app on 127.0.0.1 (only this computer) at the first free port from
7860, prints the address and opens the browser. No analytics or telemetry.
"""

from __future__ import annotations

import argparse
import socket
import sys

if sys.version_info < (3, 11):  # noqa: UP036 - checked for whoever starts it with an older Python
    sys.exit(f"error: LoRA Studio needs Python 3.11 or newer; this is {sys.version.split()[0]}. Install 3.11+ "
             f"and start again (or double-click start.sh / start.bat, which check this for you).")

from core.privacy import no_telemetry  # noqa: E402 - after the version check

# Before gradio, huggingface_hub or onnxruntime are imported: a desktop app does not phone home.
no_telemetry()


def free_port(host: str, start: int, tries: int = 100) -> int:
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise SystemExit(f"error: no free port between {start} and {start + tries - 1}; pass --port")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA Studio: train your own Stable Diffusion LoRA")
    p.add_argument("--port", type=int, default=7860, help="first port to try (default 7860; the next free one is used)")
    p.add_argument("--listen", action="store_true",
                   help="serve on all network interfaces (other computers can connect; use --auth)")
    p.add_argument("--auth", help="user:password required to open the app (with --listen)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="with --listen: a host name of this computer that other computers use to open the app "
                        "(IP addresses work without it; repeatable)")
    p.add_argument("--share", action="store_true", help="make a public gradio.live link (off unless asked)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    p.add_argument("--demo", action="store_true", help="set up the offline demo first (the demo model that learns, its "
                        "zorp dataset and preset, the tiny models, a demo dataset)")
    args = p.parse_args(argv)
    if args.auth and ":" not in args.auth:
        p.error("--auth must be user:password")
    if args.allow_host and not args.listen:
        p.error("--allow-host only matters with --listen (without it only this computer can connect)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from ui.app import build_app
    from ui.demo import make_demo
    from ui.guard import HostPolicy
    from ui.server import launch_options
    from ui.settings import AppSettings

    settings = AppSettings.from_env()
    settings.ensure()
    if args.demo:
        print(make_demo(settings))
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if args.listen:
        print("warning: --listen serves the app to every computer that can reach this one"
              + ("" if args.auth else "; add --auth user:password"), file=sys.stderr)
    port = free_port(host, args.port)
    # Requests must name this app's own address (no DNS rebinding) and come from its own pages.
    policy = HostPolicy(port, listen=args.listen)
    for name in args.allow_host:
        policy.allow(name, port)
    app = build_app(settings)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    app.queue().launch(server_name=host, server_port=port, auth=auth, share=args.share,
                       inbrowser=not args.no_browser, quiet=True, footer_links=[], prevent_thread_lock=True,
                       **launch_options(settings, policy))
    # Printed once the server answers, so whoever reads it (a person, a test) can connect at once.
    print(f"LoRA Studio is running at http://127.0.0.1:{port}  (Ctrl+C to quit)", flush=True)
    if args.share and getattr(app, "share_url", None):
        from urllib.parse import urlsplit

        policy.allow(urlsplit(app.share_url).hostname or "")  # the tunnel forwards the public host name
        print(f"public link: {app.share_url}", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

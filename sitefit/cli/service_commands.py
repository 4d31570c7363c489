"""Service commands: ``sitefit serve`` (the HTTP API), ``sitefit worker`` (an RQ worker) and
``sitefit dicom-listener`` (the DIMSE listener a PACS sends series to).

``serve`` runs jobs on an in-process worker thread when ``SITEFIT_REDIS_URL`` is unset
(embedded mode), else queues them on Redis for ``sitefit worker`` processes. Without API keys
it only binds to loopback (``Settings`` refuses anything else) and says so at start.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sitefit.cli.common import load_settings
from sitefit.exceptions import InvalidInputError

if TYPE_CHECKING:
    from server.dimse import DicomListener
    from sitefit.settings import Settings

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def register(subparsers: Subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the HTTP API (embedded worker w/o Redis)")
    serve.add_argument("--host", default=None, help="bind address (default $SITEFIT_HOST)")
    serve.add_argument("--port", type=int, default=None, help="port (default $SITEFIT_PORT)")
    serve.set_defaults(handler=run_serve)

    worker = subparsers.add_parser("worker", help="run an RQ worker for $SITEFIT_REDIS_URL")
    worker.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus here")
    worker.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    worker.set_defaults(handler=run_worker)

    listener = subparsers.add_parser(
        "dicom-listener", help="receive series from a PACS over DIMSE (C-STORE, C-ECHO)"
    )
    # the aliases are the names a configuration error gives (load_settings names the field)
    listener.add_argument(
        "--host",
        "--dicom-host",
        dest="host",
        default=None,
        help="bind address (default $SITEFIT_DICOM_HOST)",
    )
    listener.add_argument(
        "--port",
        "--dicom-port",
        dest="port",
        type=int,
        default=None,
        help="port (default $SITEFIT_DICOM_PORT)",
    )
    listener.set_defaults(handler=run_dicom_listener)


def redacted(url: str) -> str:
    """A Redis URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}{port}").geturl()


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server import create_app

    settings = load_settings(host=args.host, port=args.port)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    listening = listen(settings.host, settings.port)  # before any URL is printed
    if not settings.api_keys:
        print(
            "sitefit: no API keys configured (SITEFIT_API_KEYS): authentication is off, "
            f"so the server binds to loopback only ({settings.host})",
            flush=True,
        )
    if settings.redis_url is None:
        print("sitefit: embedded mode: jobs run in this process (SITEFIT_REDIS_URL unset)")
    else:
        print(f"sitefit: jobs are queued on {redacted(settings.redis_url)} for `sitefit worker`")
    print(f"sitefit: web page at http://{settings.host}:{settings.port}/ui/", flush=True)
    print(f"sitefit: API docs at http://{settings.host}:{settings.port}/docs", flush=True)
    hint = demo_curl(settings)
    if hint:
        print(f"sitefit: try it with the demo phantom:\n  {hint}", flush=True)
    config = uvicorn.Config(create_app(settings), log_level="info")
    uvicorn.Server(config).run(sockets=[listening])
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` for uvicorn; a port in use or not ours to take is
    one clear line, not a traceback after the URLs were printed."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror:
        raise InvalidInputError(
            f"cannot bind to {host!r}: not an address of this machine"
        ) from None
    listening = socket.socket(family, kind, proto)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind(address)
        listening.listen(2048)
    except OSError as error:
        listening.close()
        if error.errno == errno.EADDRINUSE:
            raise InvalidInputError(
                f"port {port} on {host} is already in use (another sitefit serve?): stop it, "
                "or choose another with --port or SITEFIT_PORT"
            ) from None
        raise InvalidInputError(
            f"cannot listen on {host}:{port} ({error.strerror or type(error).__name__})"
        ) from None
    listening.set_inheritable(True)
    return listening


def demo_curl(settings: Settings) -> str | None:
    """A ready `curl` upload of the demo phantom, once `sitefit demo` has written it."""
    from sitefit.cli.engine_commands import DEMO_MODEL, DEMO_TARGET_DOMAIN

    scans = sorted((settings.home / "demo" / "target" / "imagesTr").glob("*.nii.gz"))
    if not scans or not (settings.models_dir / DEMO_MODEL).is_dir():
        return None
    auth = ' -H "Authorization: Bearer $KEY"' if settings.api_keys else ""
    return (
        f"curl{auth} -F file=@{scans[0]} -F model={DEMO_MODEL} -F site={DEMO_TARGET_DOMAIN} "
        f"-F mode=adapt http://{settings.host}:{settings.port}/v1/jobs"
    )


def run_worker(args: argparse.Namespace) -> int:
    from worker.queue_worker import run_worker as work

    settings = load_settings()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if settings.redis_url is None:
        raise InvalidInputError("sitefit worker needs SITEFIT_REDIS_URL (the job queue's Redis)")
    print(f"sitefit: worker for queue {settings.queue_name!r} on {redacted(settings.redis_url)}")
    return work(settings, args.metrics_port, burst=args.burst)


def run_dicom_listener(args: argparse.Namespace) -> int:
    import signal
    import threading

    from server.dimse import DicomListener
    from sitefit.inbox import Inbox

    settings = load_settings(dicom_host=args.host, dicom_port=args.port)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    listener = DicomListener(settings, Inbox.from_settings(settings))
    listener.start()
    for line in listener_summary(listener):
        print(f"sitefit: {line}", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    listener.serve_forever(stop)
    print("sitefit: DICOM listener stopped", flush=True)
    return 0


def listener_summary(listener: DicomListener) -> list[str]:
    """What `sitefit dicom-listener` tells at start: where, which AE titles, which routes."""
    settings = listener.settings
    host, port = listener.address
    own = settings.dicom_ae_title
    routes = settings.dicom_routes
    own_route = listener.routes.get(own)
    target = (
        f"series sent to it go to route {own_route!r}"
        if own_route
        else "C-STOREs to it are refused"
    )
    lines = [f"DICOM listener on {host}:{port}, AE title {own} (C-ECHO; {target})"]
    for name, route in routes.items():
        site = route.site or "from the scanner headers"
        if route.ae_title is not None:
            dialled = f"AE title {route.ae_title}"
        else:
            dialled = f"AE title {own}" if name == own_route else "DICOMweb only (no AE title)"
        lines.append(
            f"route {name!r}: {dialled} -> model {route.model}, mode {route.mode}, site {site}"
        )
    if not routes:
        lines.append("no routes configured (SITEFIT_DICOM_ROUTES): only C-ECHO is answered")
    if settings.dicom_allowed_callers:
        lines.append("calling AE titles allowed: " + ", ".join(settings.dicom_allowed_callers))
    else:
        lines.append(
            "any calling AE title is accepted (loopback only; SITEFIT_DICOM_ALLOWED_CALLERS "
            "restricts it)"
        )
    lines.append(
        f"instances wait in {listener.inbox.root} until no instance of their series arrived for "
        f"{settings.series_idle_s:g} s; `sitefit serve` makes each series a job"
    )
    return lines

#!/opt/sitefit/bin/python
"""Container healthcheck of the sitefit images (they have no curl): exit 0 when healthy.

    sitefit-healthcheck http://127.0.0.1:8000/readyz   # the URL answers 2xx (API, worker)
    sitefit-healthcheck tcp 127.0.0.1 11112            # the port accepts a connection (listener)

Anything else (refused, timed out, an error status) exits 1 with a one-line reason, which
Docker shows in ``docker inspect`` under the container's health log.
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def check_http(url: str) -> str | None:
    """None when ``url`` answers 2xx, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status = int(response.status)
    except urllib.error.HTTPError as error:
        return f"{url} answered {error.code}"
    except (OSError, ValueError) as error:
        return f"{url}: {error}"
    return None if 200 <= status < 300 else f"{url} answered {status}"


def check_tcp(host: str, port: int) -> str | None:
    """None when ``host:port`` accepts a TCP connection, else why not."""
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return None
    except OSError as error:
        return f"{host}:{port}: {error}"


def main(argv: list[str]) -> int:
    if len(argv) == 1 and argv[0].startswith(("http://", "https://")):
        problem = check_http(argv[0])
    elif len(argv) == 3 and argv[0] == "tcp" and argv[2].isdigit():
        problem = check_tcp(argv[1], int(argv[2]))
    else:
        print("usage: sitefit-healthcheck URL | sitefit-healthcheck tcp HOST PORT", file=sys.stderr)
        return 2
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

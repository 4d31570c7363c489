"""Private network namespaces for the scale-out tests: one bridge, one namespace per "host".

:class:`Network` makes a Linux bridge in the root namespace (address ``.1``) on a test
subnet ``10.213.N.0/24`` that no interface of this machine uses, and one namespace per host,
each joined to the bridge by a veth pair. The addresses exist only on what it created, and
processes it starts in a host talk only to those addresses. Every name carries the test
process's pid (``sitefit-<pid>-<n>-<label>``; ``sfb``/``sfv`` and the pid in hex for the
interfaces, whose names are short), so that :func:`remove_stale` can delete what a killed run
left, and never anything else. :meth:`Network.close` kills the
processes started in the hosts and deletes the namespaces and the bridge; it runs however
the test ended (use the network as a context manager).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

SUBNETS = ipaddress.IPv4Network("10.213.0.0/16")  # private; a /24 of it per network
_NETNS = re.compile(r"^sitefit-(\d+)-\d+-[a-z0-9]+$")
_BRIDGE = re.compile(r"^sfb([0-9a-f]{6})[0-9a-f]$")
_made = itertools.count()  # networks made by this process


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def problem() -> str | None:
    """Why namespaces cannot be made here (``None``: they can)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    probe = f"sitefit-{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()[:200]}"
    _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Delete the namespaces and bridges of test runs whose process is gone."""
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NETNS.match(name)
        if match and not _alive(int(match.group(1))):
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", "type", "bridge").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        match = _BRIDGE.match(name)
        if match and not _alive(int(match.group(1), 16)):
            _ip("link", "del", name, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of :data:`SUBNETS` that no interface or route of this machine uses."""
    used = _ip("-o", "-4", "addr").stdout + _ip("-4", "route").stdout
    for subnet in SUBNETS.subnets(new_prefix=24):
        prefix = str(subnet.network_address).rsplit(".", 1)[0] + "."
        if subnet.network_address != SUBNETS.network_address and prefix not in used:
            return subnet
    raise RuntimeError("no free /24 left in 10.213.0.0/16")


@dataclass
class Host:
    """A network namespace with one address on the test subnet."""

    name: str
    address: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(
                self.command(argv), env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.processes.append(process)
        return process


class Network:
    """A bridge and hosts on a private /24 (see the module docs)."""

    def __init__(self) -> None:
        remove_stale()
        self.pid = os.getpid()
        self.number = next(_made) % 16
        self.tag = f"{self.pid:06x}{self.number:x}"  # interface names: 15 characters at most
        self.subnet = _free_subnet()
        self.bridge = f"sfb{self.tag}"
        self.hosts: list[Host] = []
        self._links: list[str] = []
        self._up = False

    @property
    def gateway(self) -> str:
        """The bridge's address: the root namespace, where the test itself runs."""
        return str(self.subnet.network_address + 1)

    def __enter__(self) -> Network:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._up = True
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def add_host(self, label: str) -> Host:
        """A new namespace ``label`` with the next address, joined to the bridge."""
        index = len(self.hosts) + 2
        name = f"sitefit-{self.pid}-{self.number}-{label}"
        host = Host(name, str(self.subnet.network_address + index))
        outside, inside = f"sfv{self.tag}{index:02x}", "eth0"
        _ip("netns", "add", host.name)
        self.hosts.append(host)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", host.name)
        self._links.append(outside)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", inside)
        _ip("-n", host.name, "link", "set", inside, "up")
        _ip("-n", host.name, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        """Kill every process started in a host, then delete the namespaces and the bridge."""
        for host in self.hosts:
            for process in host.processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    process.wait(30)
        for host in self.hosts:  # deleting a namespace deletes its end of the veth pair
            _ip("netns", "del", host.name, check=False)
        for link in self._links:
            _ip("link", "del", link, check=False)  # gone with its peer, normally
        if self._up:
            _ip("link", "del", self.bridge, check=False)
            self._up = False
        self.hosts.clear()
        self._links.clear()


def namespaces() -> set[str]:
    """The network namespaces that exist now."""
    return {line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.split()}


def links() -> set[str]:
    """The network interfaces of the root namespace."""
    found = set()
    for line in _ip("-o", "link").stdout.splitlines():
        found.add(line.split(":")[1].strip().split("@")[0])
    return found

"""Test hosts on their own network: a Linux network namespace joined to ours by a veth
pair, whose link a test can cut silently or make slow and lossy.

Every name starts with a prefix unique to kansas's tests and carries the creating
process's pid (namespaces ``kansas-t<pid>-<n>``, veth ends ``kt<pid>h<n>`` on our side),
so what a crashed run left behind is found and removed by the next one
(``cleanup_stale``), and a run never touches another live run's hosts. Addresses are
private ``10.x`` ones the test assigns to its own veth pair; the machine's interfaces,
addresses and firewall are never touched: every rule lives in nftables *inside* the
test host's namespace, and goes with it.

Impairments (this kernel may lack ``sch_netem``, so none of them uses it):

- ``partition()``: every packet on the link is dropped, both ways (no RST, no ICMP): a
  silent partition, as a dead switch or a firewall that drops;
- ``loss(percent)``: that share of the packets is dropped at random, each way;
- a delay: ``python -m kansas.testing.netns relay`` inside the namespace holds every
  chunk of bytes for a while, each way, before passing it on (toxiproxy-style).

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), ``ip`` and ``nft``; ``available()`` says
why not, for tests to skip.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

NS_PREFIX = "kansas-t"
IF_PREFIX = "kt"
_NS_NAME = re.compile(rf"^{NS_PREFIX}(\d+)-(\d+)$")
_IF_NAME = re.compile(rf"^{IF_PREFIX}(\d+)h(\d+)$")
_counter = itertools.count(1)
#: The nftables table every impairment lives in, inside the test host's namespace.
TABLE = "kansas_test"


class NetnsError(RuntimeError):
    """A namespace, a link or a rule could not be set up."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def available() -> str | None:
    """None if test hosts can be made here, else why not (one line)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/system-deps.sh nft=nftables iproute2)"
    name = f"{NS_PREFIX}{os.getpid()}-0"
    made = _run("ip", "netns", "add", name, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        table = _run("ip", "netns", "exec", name, "nft", "add", "table", "inet", TABLE,
                     check=False)  # fmt: skip
        if table.returncode != 0:
            return f"nftables does not work in a namespace: {table.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", name, check=False)
    return None


def cleanup_stale() -> list[str]:
    """Remove the namespaces and veth ends of kansas test runs that are gone; their names."""
    removed = []
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NS_NAME.match(name)
        if match and not _alive(int(match.group(1))):
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        fields = line.split(":")
        if len(fields) < 2:
            continue
        name = fields[1].strip().split("@")[0]
        match = _IF_NAME.match(name)
        if match and not _alive(int(match.group(1))):
            _run("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


def _used_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    used = []
    for line in _run("ip", "-o", "-4", "addr", "show", check=False).stdout.splitlines():
        match = re.search(r"inet (\S+)", line)
        if match:
            used.append(ipaddress.ip_interface(match.group(1)).network)
    for line in _run("ip", "-4", "route", "show", check=False).stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first and first != "default":
            with suppress(ValueError):
                used.append(ipaddress.ip_network(first, strict=False))
    return used


def _free_subnet() -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A /30 in 10.200.0.0/13 that no address or route here overlaps."""
    used = _used_networks()
    start = (os.getpid() * 7) % 2048
    for i in range(2048):
        n = (start + i) % 2048
        net = ipaddress.ip_network(f"10.{200 + n // 256}.{n % 256}.{(os.getpid() % 64) * 4}/30")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetnsError("no free 10.x /30 for a test link")


class TestHost:
    """A network namespace with one veth link to ours.

    ``address`` is its end of the link (servers listen there), ``peer`` ours.
    ``prefix`` runs a command inside it."""

    __test__ = False  # not a pytest class

    def __init__(self, role: str) -> None:
        n = next(_counter)
        pid = os.getpid()
        self.role = role
        self.name = f"{NS_PREFIX}{pid}-{n}"
        self.outer = f"{IF_PREFIX}{pid}h{n}"
        self.inner = f"{IF_PREFIX}{pid}n{n}"
        net = _free_subnet()
        hosts = list(net.hosts())
        self.peer, self.address = str(hosts[0]), str(hosts[1])
        self.prefixlen = net.prefixlen
        self._created = False

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def _in(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(*self.prefix, *argv, check=check)

    def create(self) -> TestHost:
        _run("ip", "netns", "add", self.name)
        self._created = True
        _run("ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        _run("ip", "link", "set", self.inner, "netns", self.name)
        _run("ip", "addr", "add", f"{self.peer}/{self.prefixlen}", "dev", self.outer)
        _run("ip", "link", "set", self.outer, "up")
        self._in("ip", "addr", "add", f"{self.address}/{self.prefixlen}", "dev", self.inner)
        self._in("ip", "link", "set", self.inner, "up")
        self._in("ip", "link", "set", "lo", "up")
        # The impairments' table: a chain each way, on the link only (not lo).
        self._in("nft", "add", "table", "inet", TABLE)
        for chain, hook in (("in", "input"), ("out", "output")):
            spec = f"{{ type filter hook {hook} priority 0; policy accept; }}"
            self._in("nft", "add", "chain", "inet", TABLE, chain, spec)
        return self

    def _rule(self, what: str) -> None:
        self._in("nft", "flush", "chain", "inet", TABLE, "in")
        self._in("nft", "flush", "chain", "inet", TABLE, "out")
        if what:
            self._in("nft", "add", "rule", "inet", TABLE, "in",
                     "iifname", self.inner, *what.split())  # fmt: skip
            self._in("nft", "add", "rule", "inet", TABLE, "out",
                     "oifname", self.inner, *what.split())  # fmt: skip

    def partition(self) -> None:
        """Drop every packet on the link, both ways: nobody is told."""
        self._rule("drop")

    def loss(self, percent: int) -> None:
        """Drop ``percent`` % of the packets at random, each way."""
        self._rule(f"numgen random mod 100 < {int(percent)} drop")

    def heal(self) -> None:
        self._rule("")

    def set_sysctl(self, key: str, value: str) -> None:
        """A per-namespace sysctl (e.g. net.ipv4.tcp_retries2) of this host only."""
        self._in("sysctl", "-q", "-w", f"{key}={value}")

    def remove(self) -> None:
        if self._created:
            _run("ip", "netns", "del", self.name, check=False)  # takes its veth end along
            self._created = False
        if _run("ip", "link", "show", self.outer, check=False).returncode == 0:
            _run("ip", "link", "del", self.outer, check=False)

    def __enter__(self) -> TestHost:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()


@contextmanager
def test_host(role: str) -> Iterator[TestHost]:
    host = TestHost(role)
    try:
        host.create()
        yield host
    finally:
        host.remove()


test_host.__test__ = False  # type: ignore[attr-defined]


# -- the delaying relay ----------------------------------------------------------------


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Pass every chunk on ``delay`` seconds after it arrived, in order."""
    due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def send() -> None:
        while True:
            when, data = await due.get()
            wait = when - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(65536)
            due.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
        writer.transport.abort()


async def _relay(listen: tuple[str, int], to: tuple[str, int], delay: float) -> None:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(*to)
        except OSError:
            cw.transport.abort()
            return
        await asyncio.gather(_pump(cr, sw, delay), _pump(sr, cw, delay))
        cw.close()
        sw.close()

    server = await asyncio.start_server(handle, *listen, backlog=4096)
    print(f"relay listening on {listen[0]}:{listen[1]} -> {to[0]}:{to[1]}", flush=True)
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kansas.testing.netns")
    sub = parser.add_subparsers(dest="command", required=True)
    relay = sub.add_parser("relay", help="pass TCP on, each chunk held DELAY s each way")
    relay.add_argument("--listen", type=_address, required=True)
    relay.add_argument("--to", type=_address, required=True)
    relay.add_argument("--delay", type=float, required=True)
    sub.add_parser("cleanup", help="remove what crashed kansas test runs left behind")
    args = parser.parse_args(argv)
    if args.command == "cleanup":
        for name in cleanup_stale():
            print(f"removed {name}")
        return
    with suppress(KeyboardInterrupt):
        asyncio.run(_relay(args.listen, args.to, args.delay))


def wait_port(host: str, port: int, seconds: float = 30) -> None:
    import socket

    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise NetnsError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.05)


if __name__ == "__main__":
    main()

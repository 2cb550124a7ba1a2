"""Give a process a fixed share of a core with a cgroup CPU quota (v1 or v2).

On a machine with fewer cores than the processes of a bench need, what a second kansas
worker adds is bounded by the CPU the load generator and the backends leave over. With
each worker capped at the same share of a core, and that share small enough that the
others always have CPU to spare, N workers can reach N times one worker's throughput if,
and only if, kansas itself scales: the accept queue spreads connections evenly and no
shared part (the master, Redis) limits them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000  # the kernel default; shorter periods made the rate vary more


class CapUnavailable(RuntimeError):
    """This machine gives the bench no cgroup CPU controller it may write."""


def _root() -> tuple[Path, int]:
    """The cgroup directory to create groups under, and the cgroup version."""
    if (V1_ROOT / "cpu.cfs_quota_us").exists() and os.access(V1_ROOT, os.W_OK):
        return V1_ROOT, 1
    controllers = V2_ROOT / "cgroup.controllers"
    writable = controllers.exists() and os.access(V2_ROOT, os.W_OK)
    if writable and "cpu" in controllers.read_text().split():
        subtree = V2_ROOT / "cgroup.subtree_control"
        if "cpu" not in subtree.read_text().split():
            with contextlib.suppress(OSError):
                subtree.write_text("+cpu")
        if "cpu" in subtree.read_text().split():
            return V2_ROOT, 2
    raise CapUnavailable("no writable cgroup CPU controller (cgroup v1 cpu or v2 cpu.max)")


def available() -> bool:
    try:
        _root()
    except (CapUnavailable, OSError):
        return False
    return True


@contextlib.contextmanager
def capped(pids: list[int], cores: float, name: str) -> Iterator[None]:
    """Each of ``pids`` (every thread of it) in a cgroup of its own, held to ``cores``
    of one core; moved back and the groups removed on the way out."""
    root, version = _root()
    quota = int(cores * PERIOD_US)
    groups: list[Path] = []
    try:
        for pid in pids:
            group = root / f"{name}-{os.getpid()}-{pid}"
            group.mkdir()
            groups.append(group)
            if version == 1:
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        for group in groups:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):  # gone meanwhile
                        (root / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()

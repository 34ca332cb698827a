"""How much CPU other processes took while we measured: the benchmark needs the machine to itself.

"Ours" is this process (with its reaped children: hey, the archivers) and every TorchServe process
whose command line names our run-dir folder (the frontend is not our child: `torchserve --start`
detaches it). Everything else busy in /proc/stat is someone else's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
IDLE_FIELDS = (3, 4)  # idle, iowait in /proc/stat's "cpu" line (after the label)


def busy_s() -> float:
    """CPU seconds spent busy by the whole machine since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - sum(fields[i] for i in IDLE_FIELDS)) / CLOCK_TICKS


def _process_s(pid: int, with_children: bool) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + (cutime + cstime if with_children else 0)) / CLOCK_TICKS


def _is_ours(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def own_s(marker: str) -> float:
    """CPU seconds of this process (+ reaped children) and of the processes whose command line has `marker`."""
    me = os.getpid()
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]
    servers = sum(_process_s(pid, False) for pid in pids if _is_ours(pid, marker.encode()))
    return _process_s(me, True) + servers


@dataclass
class CpuMeter:
    """Others' CPU use between start() and stop(), in % of one core."""

    marker: str
    _t0: float = 0.0
    _busy0: float = 0.0
    _own0: float = 0.0

    def start(self) -> CpuMeter:
        self._t0, self._busy0, self._own0 = time.monotonic(), busy_s(), own_s(self.marker)
        return self

    def others_pct(self) -> float:
        elapsed = time.monotonic() - self._t0
        others = (busy_s() - self._busy0) - (own_s(self.marker) - self._own0)
        return max(0.0, 100 * others / elapsed) if elapsed > 0 else 0.0


def wait_until_quiet(marker: str, threshold_pct: float, window_s: float, timeout_s: float) -> float:
    """Wait (at most timeout_s) for a window in which others use under threshold_pct of a core; returns their %."""
    deadline = time.monotonic() + timeout_s
    while True:
        meter = CpuMeter(marker).start()
        time.sleep(window_s)
        others = meter.others_pct()
        if others < threshold_pct or time.monotonic() >= deadline:
            return others

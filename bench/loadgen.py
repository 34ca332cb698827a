"""The load generator: `hey` (a compiled Go binary, Debian package `hey`), run as a separate process.

One hey run per concurrency level, the image file as the raw POST body (`-D`), which both the
stock handler and ours accept. Its text report is parsed for throughput, the latency
distribution and failures. hey is limited to HEY_CPUS cores so it leaves the server its cores.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BenchError

HEY_CPUS = 1
REQUEST_TIMEOUT_S = 60  # hey's per-request timeout; a request slower than this counts as an error
CONTENT_TYPE = "image/jpeg"
HEY_SLACK_S = 120  # beyond the planned duration before the hey process itself is killed
APT_INSTALL = ["apt-get", "install", "-y", "-qq", "hey"]


@dataclass
class HeyResult:
    total_s: float
    status_counts: dict[int, int] = field(default_factory=dict)
    error_counts: dict[str, int] = field(default_factory=dict)  # hey's "Error distribution"
    percentiles_ms: dict[int, float] = field(default_factory=dict)  # {50: ms, 95: ms, 99: ms, ...}
    client_cpu_s: float = 0.0
    wall_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.status_counts.get(200, 0)

    @property
    def requests(self) -> int:
        return sum(self.status_counts.values()) + sum(self.error_counts.values())

    @property
    def errors(self) -> int:
        return self.requests - self.ok

    @property
    def img_s(self) -> float:
        """Successful predictions per second (hey's own Requests/sec counts failures too)."""
        return self.ok / self.total_s if self.total_s > 0 else 0.0


def ensure_hey() -> str:
    """Path of `hey`; installed with apt-get when missing and running as root."""
    hey = shutil.which("hey")
    if hey:
        return hey
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        result = subprocess.run(APT_INSTALL, capture_output=True, text=True, env=env)
        if result.returncode == 0 and shutil.which("hey"):
            return shutil.which("hey")
        raise BenchError(f"apt-get install hey failed:\n{result.stderr[-1000:]}")
    raise BenchError("the load generator `hey` is not installed: sudo apt-get install -y hey")


def hey_version() -> str | None:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "hey"], capture_output=True, text=True)
    return (result.stdout.strip() or None) if result.returncode == 0 else None


_TOTAL = re.compile(r"^\s*Total:\s+([\d.]+) secs", re.M)
_PERCENTILE = re.compile(r"^\s*(\d+)%+ in ([\d.]+) secs", re.M)
_SECTION = r"{}:\n((?:[ \t]+\[.*\n?)*)"
_BRACKET_LINE = re.compile(r"^\s*\[(\d+)\]\s+(.*?)\s*$", re.M)  # "[200]\t57 responses", "[3]\tGet ...: refused"


def _section(text: str, title: str) -> list[tuple[int, str]]:
    match = re.search(_SECTION.format(re.escape(title)), text)
    return [(int(key), rest) for key, rest in _BRACKET_LINE.findall(match.group(1))] if match else []


def parse_hey(text: str) -> HeyResult:
    total = _TOTAL.search(text)
    if not total:
        raise BenchError(f"cannot parse hey's output:\n{text[-2000:]}")
    statuses = {code: int(rest.split()[0]) for code, rest in _section(text, "Status code distribution")}
    errors = {}
    for count, message in _section(text, "Error distribution"):
        errors[message] = errors.get(message, 0) + count
    # With few requests hey prints "0% in 0.0000 secs" for a percentile it cannot place: skip those.
    percentiles = {int(p): float(s) * 1000 for p, s in _PERCENTILE.findall(text) if int(p) > 0}
    return HeyResult(float(total.group(1)), statuses, errors, percentiles)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_hey(
    url: str,
    image: Path,
    concurrency: int,
    duration_s: float | None,
    requests: int | None,
    content_type: str = CONTENT_TYPE,
) -> HeyResult:
    """One load level: `duration_s` seconds (hey -z) or exactly `requests` requests (hey -n), the file
    `image` as each request's body."""
    amount = ["-n", str(max(requests, concurrency))] if requests else ["-z", f"{duration_s:g}s"]
    cmd = [ensure_hey(), *amount, "-c", str(concurrency), "-cpus", str(HEY_CPUS), "-t", str(REQUEST_TIMEOUT_S)]
    cmd += ["-m", "POST", "-T", content_type, "-D", str(image), url]
    budget = (duration_s or 0) + REQUEST_TIMEOUT_S + HEY_SLACK_S if not requests else None
    cpu_before = _children_cpu_s()
    started = time.monotonic()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        raise BenchError(f"hey did not finish within {budget:.0f} s") from None
    if result.returncode != 0:
        raise BenchError(f"hey failed ({result.returncode}): {result.stderr[-1000:]}")
    parsed = parse_hey(result.stdout)
    parsed.client_cpu_s = _children_cpu_s() - cpu_before
    parsed.wall_s = time.monotonic() - started
    return parsed

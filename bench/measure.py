"""Figures computed exactly as the peer baseline's xmpp_load.py computes them.

Server CPU is the daemon's utime+stime over the measured phase, the
generator's CPU its own rusage (a client-bound run shows as client CPU near
one core), percentiles use xmpp_load's nearest-rank index on all samples, in
milliseconds.
"""

import resource
import time

from twisted.internet.task import LoopingCall

from bench.daemon import cpu_seconds, listen_overflows, memory_kb


def pct(values, p):
    """The p-th percentile of `values` (seconds) in ms, xmpp_load's nearest-rank rule."""
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(p / 100.0 * (len(ordered) - 1)))))
    return round(ordered[k] * 1000.0, 3)


def latency_figures(values, prefix=""):
    """{prefix}p50_ms, p99_ms and max_ms of `values`."""
    return {f"{prefix}{name}_ms": pct(values, p) for name, p in (("p50", 50), ("p99", 99), ("max", 100))}


def own_cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_ticks():
    """(steal, total) jiffies of the whole VM from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    return fields[7], sum(fields)


class Meter:
    """Wall time, daemon CPU, generator CPU and listen-queue drops from start() to stop()."""

    def __init__(self, pid):
        self.pid = pid
        self.wall0 = self.server0 = self.client0 = self.overflows0 = self.rss0 = self.ticks0 = None

    def start(self):
        self.overflows0 = listen_overflows()
        self.rss0 = memory_kb(self.pid) if self.pid else None
        self.server0 = cpu_seconds(self.pid) if self.pid else None
        self.client0 = own_cpu()
        self.ticks0 = cpu_ticks()
        self.wall0 = time.perf_counter()

    def stop(self, work):
        """The figures, with `per_server_cpu_s` = work units per daemon CPU-second."""
        wall = time.perf_counter() - self.wall0
        steal, total = (now - then for now, then in zip(cpu_ticks(), self.ticks0))
        figures = {
            # CPU time the hypervisor gave other guests: a busy host slows every figure
            "host_steal_pct": round(100 * steal / total, 1) if total else None,
            "wall_s": round(wall, 3),
            "client_cpu_s": round(own_cpu() - self.client0, 3),
            "host_listen_overflows": listen_overflows() - self.overflows0,
        }
        if self.pid:
            server = cpu_seconds(self.pid) - self.server0
            figures.update(
                server_cpu_s=round(server, 3),
                server_cpu_util=round(server / wall, 3) if wall > 0 else None,
                per_server_cpu_s=round(work / server, 1) if server > 0 else None,
                server_rss_start_kb=self.rss0,
                server_rss_kb=memory_kb(self.pid),
                server_rss_lifetime_peak_kb=memory_kb(self.pid, "VmHWM"),
            )
        return figures


class RssSampler:
    """The daemon's VmRSS every `interval` seconds; `peak` is the largest seen."""

    def __init__(self, reactor, pid, interval=0.05):
        self.pid = pid
        self.peak = memory_kb(pid) if pid else None
        self.samples = 0
        self._loop = LoopingCall(self._sample)
        self._loop.clock = reactor
        self._interval = interval

    def _sample(self):
        self.samples += 1
        self.peak = max(self.peak, memory_kb(self.pid))

    def start(self):
        if self.pid:
            self._loop.start(self._interval)

    def stop(self):
        if self._loop.running:
            self._loop.stop()
            self._sample()
        return self.peak

"""Benchmark the gateway against the mock upstream, nginx, a bare pass-through and LiteLLM: one command.

From the repository root::

    .venv/bin/python -m bench.run --setup-litellm   # once: LiteLLM into bench/.litellm-venv (a few minutes)
    .venv/bin/python -m bench.run                    # the full run (about 17 minutes on 2 cores)
    .venv/bin/python -m bench.run --quick            # smoke run: every target and point, once, briefly

Everything listens on 127.0.0.1 and every server is stopped at the end (also on errors and Ctrl-C). One
mock upstream (:mod:`bench.mock_upstream`, 20 chunks 5 ms apart) serves every target; the slow points ask
it for 100 ms to the first byte, 20 chunks 20 ms apart (streams) or 0.5 s in all (JSON) with the per-request
``"mock"`` knob in the body. Each repetition runs every point for every target, one after the other (target
order rotated per repetition), so slow drift of a shared machine hits all targets alike; the report gives
medians over repetitions and ratios to ``direct`` taken within each repetition. The capacity test (1,000
streams open for 30 s while ``GET /models`` is probed every 50 ms) runs once per target that has it.

The kernel schedules the load driver (this process) and the servers freely over all CPUs: ``--pin`` pins the
driver to CPU 0 and every server to the others with ``taskset`` instead, but on 2 cores that leaves the
gateway's 2 workers and the mock one core, and it made the numbers no steadier (see docs/benchmarks.md).

Output: a Markdown report on stdout and in ``bench/results/latest.md``, all numbers in ``latest.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import loadgen
from . import report
from . import targets as tg
from .procstat import cpu_seconds
from .procstat import rss_bytes
from .procstat import tree_pids

RESULTS = tg.REPO / "bench" / "results"
HOST = "127.0.0.1"
#: Slow upstream, per request: 100 ms to the first byte, then 20 chunks 20 ms apart; JSON answers after 0.5 s.
SLOW = {"ttfb": 0.1, "chunks": 20, "gap": 0.02, "latency": 0.4}
#: Seconds a capacity-test stream may run past its due end before it is cut and counted as failed.
CAPACITY_GRACE = 15.0
#: The capacity test's GET /models probe: one every PROBE_INTERVAL s after the last answer, PROBE_TIMEOUT s at most.
PROBE_INTERVAL = 0.05
PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Point:
    kind: str           # "json" | "stream"
    upstream: str       # "fast" | "slow"
    concurrency: int

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.upstream}-c{self.concurrency}"

    @property
    def stream(self) -> bool:
        return self.kind == "stream"


POINTS = ([Point(kind, "fast", c) for kind in ("json", "stream") for c in (1, 8, 64)]
          + [Point(kind, "slow", c) for kind in ("json", "stream") for c in (64, 256)])


@dataclass
class Settings:
    reps: int
    warmup: float
    warmup_max: float
    duration: float
    capacity_streams: int
    capacity_chunks: int
    capacity_gap: float
    capacity_ramp: float
    targets: list[str]
    pin: bool
    baseline: str | None
    points: list[Point]


def chat_body(stream: bool, knobs: dict | None = None) -> bytes:
    body: dict = {"model": tg.MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64}
    if stream:
        body["stream"] = True
    if knobs:
        body["mock"] = knobs
    return json.dumps(body, separators=(",", ":")).encode()


def chat_request(target: tg.Target, stream: bool, knobs: dict | None = None) -> bytes:
    return loadgen.build_request("POST", HOST, target.port, f"{target.prefix}/chat/completions", target.headers,
                                 chat_body(stream, knobs))


def models_request(target: tg.Target) -> bytes:
    return loadgen.build_request("GET", HOST, target.port, f"{target.prefix}/models", target.headers)


class Meter:
    """The CPU time and peak RSS of one server's process tree around a measurement."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.pids = tree_pids(root)
        self.cpu: dict[str, float] = {}
        self.peak_rss = 0

    def mark(self, edge: str) -> None:
        self.cpu[edge] = cpu_seconds(self.pids)

    async def sample(self, interval: float = 0.1) -> None:
        """Track the peak RSS until cancelled (re-walking the tree now and then: workers may be replaced)."""
        n = 0
        while True:
            n += 1
            if n % 20 == 0:
                self.pids = tree_pids(self.root)
            self.peak_rss = max(self.peak_rss, rss_bytes(self.pids))
            await asyncio.sleep(interval)


# --------------------------------------------------------------------------- the run


async def verify(t: tg.Target, procs: tg.Processes) -> None:
    """Wait until the target answers, then check a JSON answer, a stream, the mock knobs and ``GET /models``.

    :raise TargetError: it exited, never answered, or answered wrongly.
    """
    timeout = 300 if t.name == "litellm" else 60
    deadline = time.monotonic() + timeout
    try:
        while True:
            if t.proc.poll() is not None:
                raise tg.TargetError(f"exited with {t.proc.returncode}:\n{procs.log_tail(t.log)}")
            try:
                resp, _ = await loadgen.fetch(HOST, t.port, chat_request(t, False), timeout=10)
                if loadgen.check(resp, False) is None:
                    break
            except (OSError, loadgen.ResponseError, asyncio.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise tg.TargetError(f"not answering after {timeout} s:\n{procs.log_tail(t.log)}")
            await asyncio.sleep(0.25)
        resp, _ = await loadgen.fetch(HOST, t.port, chat_request(t, True))
        if why := loadgen.check(resp, True):
            raise tg.TargetError(f"stream check failed: {why}")
        resp, took = await loadgen.fetch(HOST, t.port, chat_request(t, False, SLOW))
        if loadgen.check(resp, False) or took < 0.45:
            raise tg.TargetError(f"the per-request mock knobs do not get through (slow JSON took {took:.3f} s)")
        resp, _ = await loadgen.fetch(HOST, t.port, models_request(t))
        if resp.status != 200:
            raise tg.TargetError(f"GET {t.prefix}/models answered {resp.status}")
    except (OSError, loadgen.ResponseError, asyncio.TimeoutError) as exc:
        raise tg.TargetError(f"{type(exc).__name__}: {exc}") from exc


class Bench:
    """One run: the targets, and every number measured on them (per point, target and repetition)."""

    def __init__(self, settings: Settings, procs: tg.Processes) -> None:
        self.s = settings
        self.procs = procs
        self.targets: dict[str, tg.Target] = {}
        self.status: dict[str, dict] = {}
        self.points: dict[str, dict[str, list[dict]]] = {p.key: {} for p in settings.points}
        self.capacity: dict[str, dict] = {}

    def fail(self, name: str, error: str) -> None:
        log(f"!! {name}: {error.splitlines()[0] if error else 'failed'}")
        self.status[name] = {"status": "failed", "error": error}
        target = self.targets.pop(name, None)
        if target is not None and target.name != "direct":
            self.procs.stop(target.proc)

    async def start(self) -> None:
        mock, mock_port = tg.start_mock(self.procs)
        starters = {
            "direct": lambda: tg.direct(mock, mock_port),
            "nginx": lambda: tg.start_nginx(self.procs, mock_port),
            "bare": lambda: tg.start_bare(self.procs, mock_port),
            "boundless-gthread": lambda: tg.start_boundless(self.procs, mock_port, "gthread"),
            "boundless-gevent": lambda: tg.start_boundless(self.procs, mock_port, "gevent"),
            "litellm": lambda: tg.start_litellm(self.procs, mock_port),
            tg.BASELINE: lambda: tg.start_baseline(self.procs, mock_port, self.s.baseline),
        }
        for name in self.s.targets:
            try:
                self.targets[name] = starters[name]()
            except (tg.TargetError, OSError, subprocess.SubprocessError) as exc:
                self.fail(name, str(exc))
        await asyncio.gather(*(self.verify(t) for t in list(self.targets.values())))
        self.targets = {n: self.targets[n] for n in self.s.targets if n in self.targets}   # keep the order

    async def verify(self, t: tg.Target) -> None:
        started = time.monotonic()
        try:
            await verify(t, self.procs)
        except tg.TargetError as exc:
            self.fail(t.name, str(exc))
            return
        self.status[t.name] = {"status": "ok", "error": "", "ready_s": round(time.monotonic() - started, 1)}
        log(f"{t.name} ready on port {t.port} ({time.monotonic() - started:.1f} s)")

    async def measure(self, t: tg.Target, point: Point) -> dict:
        meter = Meter(t.proc.pid)
        sampler = asyncio.ensure_future(meter.sample())
        request = chat_request(t, point.stream, SLOW if point.upstream == "slow" else None)
        try:
            stats = await loadgen.run_point(HOST, t.port, request, point.concurrency, stream=point.stream,
                                            warmup=self.s.warmup, warmup_max=self.s.warmup_max,
                                            duration=self.s.duration, on_window=meter.mark)
        finally:
            sampler.cancel()
        out = stats.summary()
        served = out["requests"]
        out["cpu_ms_per_req"] = ((meter.cpu["end"] - meter.cpu["start"]) * 1000 / served) if served else math.nan
        out["rss_peak_mib"] = meter.peak_rss / report.MIB
        return out

    async def repetitions(self) -> None:
        names = list(self.targets)
        for rep in range(self.s.reps):
            order = names[rep % len(names):] + names[:rep % len(names)] if names else []
            for point in self.s.points:
                for name in order:
                    t = self.targets.get(name)
                    if t is None:
                        continue
                    if t.proc.poll() is not None:
                        self.fail(name, f"died during the run:\n{self.procs.log_tail(t.log)}")
                        continue
                    summary = await self.measure(t, point)
                    self.points[point.key].setdefault(name, []).append(summary)
                    log(f"[{rep + 1}/{self.s.reps}] {point.key:18} {name:18} {_brief(summary)}")
                    await asyncio.sleep(0.2)

    async def capacity_tests(self) -> None:
        s = self.s
        knobs = {"chunks": s.capacity_chunks, "gap": s.capacity_gap}
        length = s.capacity_chunks * s.capacity_gap
        for t in [t for t in self.targets.values() if t.capacity]:
            log(f"capacity: {t.name}, {s.capacity_streams} streams of {length:.0f} s ...")
            meter = Meter(t.proc.pid)
            sampler = asyncio.ensure_future(meter.sample(0.25))
            try:
                stats = await loadgen.run_capacity(
                    HOST, t.port, chat_request(t, True, knobs), s.capacity_streams, ramp=s.capacity_ramp,
                    deadline=s.capacity_ramp + length + CAPACITY_GRACE, probe_request=models_request(t),
                    probe_interval=PROBE_INTERVAL, probe_timeout=PROBE_TIMEOUT)
            finally:
                sampler.cancel()
            out = stats.summary()
            out["rss_peak_mib"] = meter.peak_rss / report.MIB
            self.capacity[t.name] = out
            log(f"capacity: {t.name}: {out['ok']}/{out['streams']} ok, peak open {out['peak_open']}, /models p99 "
                f"{out['probe_p99_ms']:.1f} ms, {out['probe_errors']} probe errors, RSS {out['rss_peak_mib']:.0f} MiB")
            await asyncio.sleep(1.0)

    def peak_rss(self) -> None:
        for name, st in self.status.items():
            if st["status"] == "ok":
                peaks = [r["rss_peak_mib"] for runs in self.points.values() for r in runs.get(name, [])]
                st["peak_rss_mib"] = max(peaks, default=math.nan)


def _brief(s: dict) -> str:
    text = f"{s['rps']:8.1f}/s p50 {s['p50_ms']:7.2f} p99 {s['p99_ms']:7.2f} ms"
    if "ttfc_p50_ms" in s:
        text += f" ttfc {s['ttfc_p50_ms']:6.2f}"
    text += f" cpu {s['cpu_ms_per_req']:.2f} ms/req client {s['client_cpu_pct']:.0f}%"
    return text + (f" ERRORS {s['error_kinds']}" if s["errors"] else "")


def _finite(obj: object) -> object:
    """The result with NaN (no data) as null, so that latest.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- metadata


def machine() -> dict:
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    mem = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout
    total = next((line.split()[1] for line in mem.splitlines() if line.startswith("Mem:")), "?")
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model, "mem_total": total, "free_h": mem.strip(),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()), "kernel": platform.release()}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("gunicorn", "flask", "werkzeug", "requests", "gevent"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "?"
    try:
        nginx = subprocess.run([tg.NGINX, "-v"], capture_output=True, text=True)
        out["nginx"] = nginx.stderr.strip().rsplit("/", 1)[-1] or "?"
    except OSError:
        out["nginx"] = "not installed"
    out["litellm"] = tg.litellm_version() or "not installed"
    return out


def code_version() -> str:
    """The gateway's commit, and whether its code has uncommitted changes (read-only git commands)."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=tg.REPO, capture_output=True, text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else ""
    head = git("log", "-1", "--format=%h %s")
    if not head:
        return "unknown (not a git checkout)"
    dirty = git("diff", "--name-only", "HEAD", "--", "app", "wsgi.py", "gunicorn.conf.py").splitlines()
    return head + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


# --------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup-litellm", action="store_true",
                        help="(re)install LiteLLM into bench/.litellm-venv and exit")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repetition, 1 s points, 100 capacity streams of 3 s")
    parser.add_argument("--reps", type=int, help="repetitions (default 3)")
    parser.add_argument("--duration", type=float, help="measured seconds per point (default 2.5)")
    parser.add_argument("--warmup", type=float,
                        help="least warm-up seconds per point (default 0.5); it goes on until every client has had "
                             "an answer, up to 10 s (3 s with --quick)")
    parser.add_argument("--targets", default=",".join(tg.TARGET_NAMES),
                        help=f"comma-separated subset of {','.join(tg.TARGET_NAMES)}")
    parser.add_argument("--points", default="",
                        help="comma-separated subset of " + ",".join(p.key for p in POINTS) + " (default all)")
    parser.add_argument("--no-capacity", action="store_true", help="skip the open-streams capacity test")
    parser.add_argument("--pin", action="store_true",
                        help="pin the load driver to CPU 0 and the servers to the other CPUs (taskset)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.md / latest.json go")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (every server's log, the gateways' databases) and print its path")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run the gateway at git commit REV (its shipped gunicorn.conf.py), as target "
                             f"{tg.BASELINE}: before/after in the same interleaved run")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    if unknown := set(names) - set(tg.TARGET_NAMES):
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if "direct" not in names:
        names.insert(0, "direct")          # the floor every ratio needs
    if args.baseline:
        names.append(tg.BASELINE)
    wanted = [k.strip() for k in args.points.split(",") if k.strip()]
    if unknown := set(wanted) - {p.key for p in POINTS}:
        parser.error(f"unknown points: {', '.join(sorted(unknown))}")
    quick = args.quick
    settings = Settings(
        reps=args.reps or (1 if quick else 3),
        warmup=args.warmup if args.warmup is not None else (0.3 if quick else 0.5),
        warmup_max=3.0 if quick else 10.0,
        duration=args.duration or (1.0 if quick else 2.5),
        capacity_streams=0 if args.no_capacity else (100 if quick else 1000),
        capacity_chunks=30 if quick else 300, capacity_gap=0.1, capacity_ramp=0.5 if quick else 2.0,
        targets=names, pin=args.pin and (os.cpu_count() or 1) > 1, baseline=args.baseline,
        points=[p for p in POINTS if not wanted or p.key in wanted])
    return args, settings


async def _run(bench: Bench) -> None:
    await bench.start()
    await bench.repetitions()
    if bench.s.capacity_streams:
        await bench.capacity_tests()


def main(argv: list[str] | None = None) -> int:
    args, s = parse_args(argv)
    if args.setup_litellm:
        print(f"LiteLLM {tg.setup_litellm()} installed in {tg.LITELLM_VENV}")
        return 0

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM):     # also when started in the background with SIGINT ignored
        signal.signal(sig, terminate)

    server_cpus = None
    if s.pin:
        os.sched_setaffinity(0, {0})
        server_cpus = ",".join(str(c) for c in range(1, os.cpu_count() or 2))
    pinning = (f"load driver pinned to CPU 0, every server (mock included) to CPU {server_cpus} with taskset"
               if s.pin else "no CPU pinning (driver and servers share all CPUs)")
    meta = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
            "code": code_version(), "baseline": s.baseline, "versions": versions(), "reps": s.reps, "warmup": s.warmup,
            "warmup_max": s.warmup_max, "duration": s.duration, "pinning": pinning,
            "points": [p.key for p in s.points], "slow_knobs": SLOW,
            "capacity": {"streams": s.capacity_streams, "chunks": s.capacity_chunks, "gap": s.capacity_gap,
                         "ramp": s.capacity_ramp, "grace": CAPACITY_GRACE, "probe_interval": PROBE_INTERVAL,
                         "probe_timeout": PROBE_TIMEOUT}}
    log(f"{meta['machine']['cpu_model']} x{meta['machine']['nproc']}; {pinning}")
    workdir = Path(tempfile.mkdtemp(prefix="boundless-bench-"))
    procs = tg.Processes(workdir, server_cpus)
    bench = Bench(s, procs)
    t0 = time.monotonic()
    gc.freeze()                                   # keep the driver's collector away from setup objects
    try:
        asyncio.run(_run(bench))
    except KeyboardInterrupt:
        log("interrupted: stopping every server")
        return 130
    except tg.TargetError as exc:                 # only the mock upstream's failure stops the whole run
        log(f"cannot run: {exc}")
        return 1
    finally:
        procs.close()
        tg.remove_baseline(procs)
        if args.keep:
            log(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    meta["wall_s"] = time.monotonic() - t0
    bench.peak_rss()
    result = {"meta": meta, "targets": bench.status, "points": bench.points,
              "aggregate": report.aggregate(bench.points), "capacity": bench.capacity}
    text = report.markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(text + "\n")
    (args.out / "latest.json").write_text(json.dumps(_finite(result), indent=1, default=str) + "\n")
    print(text)
    log(f"written {args.out / 'latest.md'} and {args.out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

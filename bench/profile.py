"""Profile one gateway worker with py-spy under load: where its CPU goes, and where its requests wait.

From the repository root (py-spy: ``.venv/bin/pip install py-spy``)::

    .venv/bin/python -m bench.profile                          # gthread, JSON then stream, c=8, 15 s each
    .venv/bin/python -m bench.profile --worker-class gevent --paths json --seconds 20

It starts the mock upstream and the gateway exactly as :mod:`bench.run` does (every feature on), drives
``--concurrency`` clients at it, and meanwhile records one worker with
``py-spy record --native --idle --format raw``: every thread's stack, native frames included, at each sample.
Telling CPU from waiting is then done here, from the native frames under the innermost Python frame, because
py-spy's own idle filter cannot (a gthread pool thread blocked on its queue looks busy to it):

* waiting: SQLite's busy handler sleeping on a locked database; re-taking the GIL (``pthread_cond_timedwait``
  / ``pthread_mutex_lock`` right under a C call); a Python lock or queue; ``epoll``/``poll``/``recv``;
  ``sleep``; ``fsync``;
* anything else is on CPU (Python code, or C it called: SQLite's engine, ``send``, JSON, hashing ...).

Written to ``bench/results/``:

* ``profile-<class>-<path>.txt``: on CPU, the top functions by own time (the innermost Python frame, so C
  code called from Python counts for its caller), the gateway's own (``app/``) functions by inclusive time and
  the native leaves; then the waits inside requests, by where in the app they happen; all in % of samples;
* ``profile-<class>-<path>.svg``: a flamegraph of the on-CPU samples (Python frames), open in a browser;
* ``profile-<class>-<path>.raw``: py-spy's collapsed stacks, for any other tool.
"""
from __future__ import annotations

import argparse
import asyncio
import html
import re
import shutil
import sys
import tempfile
import zlib
from collections import Counter
from pathlib import Path

from . import loadgen
from . import targets as tg
from .procstat import tree_pids
from .run import HOST
from .run import RESULTS
from .run import chat_request
from .run import code_version
from .run import log
from .run import verify

PY_SPY = Path(sys.executable).parent / "py-spy"
#: "function (location)" where location is "path.py:12", "cursor.c:896" or "libc.so.6"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<loc>[^()]*)\)$")
_PYTHON_LOC = re.compile(r"(\.py|<string>|<frozen [^>]*>):\d+$")
_LOCK_WAIT = ("pthread_cond_timedwait", "pthread_cond_wait", "pthread_mutex_lock", "sem_wait", "sem_timedwait",
              "sem_clockwait")
_IO_WAIT = {"epoll_wait": "poll/recv (socket)", "poll": "poll/recv (socket)", "ppoll": "poll/recv (socket)",
            "select": "poll/recv (socket)", "recv": "poll/recv (socket)", "recvfrom": "poll/recv (socket)",
            "accept4": "poll/recv (socket)", "clock_nanosleep": "sleep", "nanosleep": "sleep", "usleep": "sleep",
            "fdatasync": "fsync (disk)", "fsync": "fsync (disk)"}

Stack = tuple[str, ...]


def _parse(frame: str) -> tuple[str, str, bool]:
    """(function, location, is_python) of one raw py-spy frame."""
    m = _FRAME.match(frame)
    if not m:
        return frame, "", False
    return m["func"], m["loc"], bool(_PYTHON_LOC.search(m["loc"]))


def short(frame: str) -> str:
    """``func (…/site-packages/pkg/mod.py:12)`` -> ``pkg/mod.py:func`` (lines merged, paths shortened)."""
    func, loc, _ = _parse(frame)
    path = loc.rsplit(":", 1)[0] if ":" in loc else loc
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/lib/python3." in path:
        path = "stdlib/" + path.split("/lib/python3.", 1)[1].split("/", 1)[1]
    else:
        path = path.replace(str(tg.REPO) + "/", "")
    return f"{path}:{func}" if path else func


def classify(frames: list[str]) -> str | None:
    """The kind of wait this stack is in, or None when it is on CPU (judged below the innermost Python frame)."""
    native = []
    for frame in reversed(frames):
        func, _, is_python = _parse(frame)
        if is_python:
            break
        native.append(func)
    if "sqlite3InvokeBusyHandler" in native:
        return "SQLite busy handler (database locked)"
    if "PyThread_acquire_lock_timed" in native:
        return "Python lock / queue"
    if any(f in _LOCK_WAIT for f in native):
        return "GIL (re-taking it after a C call)"
    return _IO_WAIT.get(native[0]) if native else None


def in_request(frames: list[str]) -> bool:
    return any(".handle_request (" in f or f.startswith("handle_request (") for f in frames)


class Profile:
    """Collapsed stacks split into on-CPU samples and waits."""

    def __init__(self, raw: str) -> None:
        self.cpu: Counter[Stack] = Counter()            # Python frames only, root first
        self.cpu_native_leaf: Counter[str] = Counter()
        self.waits: Counter[tuple[str, str]] = Counter()  # (where in the app, kind), request threads only
        self.request_samples = 0
        for line in raw.splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            n = int(count)
            kind = classify(frames)
            python = tuple(short(f) for f in frames if _parse(f)[2])
            if in_request(frames):
                self.request_samples += n
                if kind is not None:
                    where = next((f for f in reversed(python) if f.startswith("app/")), python[-1] if python else "?")
                    self.waits[(where, kind)] += n
            if kind is None and python:
                self.cpu[python] += n
                leaf = frames[-1]
                if not _parse(leaf)[2]:
                    self.cpu_native_leaf[short(leaf)] += n

    @property
    def cpu_samples(self) -> int:
        return sum(self.cpu.values())

    def top_own(self, n: int) -> list[tuple[str, int]]:
        own: Counter[str] = Counter()
        for stack, k in self.cpu.items():
            own[stack[-1]] += k
        return own.most_common(n)

    def top_total(self, n: int) -> list[tuple[str, int]]:
        """The gateway's own functions (``app/``) by inclusive on-CPU time."""
        total: Counter[str] = Counter()
        for stack, k in self.cpu.items():
            for f in set(stack):
                if f.startswith("app/"):
                    total[f] += k
        return total.most_common(n)

    def report(self, title: str, n: int) -> str:
        cpu = self.cpu_samples or 1
        req = self.request_samples or 1
        lines = [title, "", f"ON CPU: {self.cpu_samples} samples (own = the innermost Python frame; C code it calls "
                             f"counts for it)", "", "  own %  function"]
        lines += [f"  {100 * k / cpu:5.1f}  {f}" for f, k in self.top_own(n)]
        lines += ["", "total %  the gateway's own functions (app/), inclusive"]
        lines += [f"  {100 * k / cpu:5.1f}  {f}" for f, k in self.top_total(n)]
        lines += ["", "  own %  native leaf on CPU (under the Python frames above)"]
        lines += [f"  {100 * k / cpu:5.1f}  {f}" for f, k in self.cpu_native_leaf.most_common(8)]
        lines += ["", f"WAITING inside requests: % of the {self.request_samples} samples of threads serving a "
                      f"request (gthread: each pool thread; gevent: only the greenlet running at the sample)", ""]
        lines += [f"  {100 * k / req:5.1f}  {where}  <- {kind}" for (where, kind), k in self.waits.most_common(n)]
        return "\n".join(lines)


# --------------------------------------------------------------------------- flamegraph


def flamegraph_svg(stacks: Counter[Stack], title: str, width: int = 1200, row: int = 17) -> str:
    """A minimal self-contained flamegraph (root at the bottom, hover for names and %)."""
    tree: dict = {}
    for stack, k in stacks.items():
        node = tree
        for f in stack:
            entry = node.setdefault(f, [0, {}])
            entry[0] += k
            node = entry[1]
    total = sum(stacks.values()) or 1

    def depth(node: dict) -> int:
        return 1 + max((depth(child) for _, child in node.values()), default=0)

    rows = depth(tree)
    height = (rows + 2) * row + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" '
           f'font-size="11"><rect width="100%" height="100%" fill="#fdfdf6"/>',
           f'<text x="6" y="14" font-size="13">{html.escape(title)}</text>']

    def draw(node: dict, x: float, level: int) -> None:
        for name, (k, child) in sorted(node.items()):
            w = width * k / total
            if w >= 0.5:
                y = height - (level + 1) * row
                hue = 10 + zlib.crc32(name.encode()) % 50
                label = name if len(name) * 6.6 < w - 4 else name[:max(0, int((w - 4) / 6.6) - 1)] + "…"
                out.append(f'<g><title>{html.escape(name)} — {100 * k / total:.1f}%</title>'
                           f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" fill="hsl({hue},85%,62%)"/>'
                           + (f'<text x="{x + 2:.1f}" y="{y + row - 5}">{html.escape(label)}</text>'
                              if w > 20 else "") + "</g>")
                draw(child, x, level + 1)
            x += w

    draw(tree, 0.0, 0)
    out.append("</svg>")
    return "\n".join(out)


# --------------------------------------------------------------------------- driving it


def worker_pids(master: int) -> list[int]:
    """The gunicorn workers among the master's descendants."""
    out = []
    for pid in tree_pids(master):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if pid != master and b"gunicorn" in cmdline:
            out.append(pid)
    return out


async def record(procs: tg.Processes, pid: int, seconds: int, rate: int, out: Path) -> None:
    name = f"py-spy-{out.stem}"
    proc = procs.spawn(name, [str(PY_SPY), "record", "--pid", str(pid), "--native", "--idle", "--duration",
                              str(seconds), "--rate", str(rate), "--format", "raw", "-o", str(out)])
    code = await asyncio.to_thread(proc.wait)
    procs.stop(proc)
    if code or not out.exists():
        raise RuntimeError(f"py-spy failed ({code}):\n{procs.log_tail(name)}")


async def profile_path(procs: tg.Processes, target: tg.Target, worker: int, path: str,
                       args: argparse.Namespace) -> str:
    stream = path == "stream"
    stem = args.out / f"profile-{args.worker_class}-{path}"
    load = asyncio.ensure_future(loadgen.run_point(
        HOST, target.port, chat_request(target, stream), args.concurrency, stream=stream, warmup=1.0,
        duration=args.seconds + 1.5))
    await asyncio.sleep(1.5)
    await record(procs, worker, args.seconds, args.rate, stem.with_suffix(".raw"))
    stats = (await load).summary()
    prof = Profile(stem.with_suffix(".raw").read_text())
    title = (f"boundless-{args.worker_class}, {path} c={args.concurrency}: {stats['rps']:.0f} req/s, p50 "
             f"{stats['p50_ms']:.2f} ms, {stats['errors']} errors; worker {worker}, py-spy --native --idle at "
             f"{args.rate} Hz for {args.seconds} s\ngateway code: {code_version()}")
    text = prof.report(title, args.top)
    stem.with_suffix(".txt").write_text(text + "\n")
    stem.with_suffix(".svg").write_text(flamegraph_svg(prof.cpu, "on CPU — " + title.splitlines()[0]))
    return text


async def _main(args: argparse.Namespace, procs: tg.Processes) -> None:
    _, mock_port = tg.start_mock(procs)
    target = tg.start_boundless(procs, mock_port, args.worker_class)
    await verify(target, procs)
    workers = worker_pids(target.proc.pid)
    if not workers:
        raise tg.TargetError("no gunicorn worker found")
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.paths.split(","):
        log(f"profiling {path} on worker {workers[0]} ...")
        print(await profile_path(procs, target, workers[0], path, args) + "\n", flush=True)
    log(f"written to {args.out}/profile-{args.worker_class}-*.{{txt,svg,raw}}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker-class", choices=("gthread", "gevent"), default="gthread")
    parser.add_argument("--paths", default="json,stream", help="json, stream or json,stream")
    parser.add_argument("--seconds", type=int, default=15, help="py-spy recording length per path")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15, help="functions listed")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if set(args.paths.split(",")) - {"json", "stream"}:
        parser.error("--paths takes json, stream or json,stream")
    if not PY_SPY.exists():
        parser.error(f"{PY_SPY} is missing: .venv/bin/pip install py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="boundless-profile-"))
    procs = tg.Processes(workdir, None)
    try:
        asyncio.run(_main(args, procs))
    except KeyboardInterrupt:
        return 130
    except (tg.TargetError, RuntimeError) as exc:
        log(f"profiling failed: {exc}")
        return 1
    finally:
        procs.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

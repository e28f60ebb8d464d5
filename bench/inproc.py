"""The whole request in-process: CPU and wall time per paid chat request, the gateway next to the bare pass-through.

From the repository root::

    .venv/bin/python -m bench.inproc                    # JSON, 5 batches of 1,000 requests each (~30 s)
    .venv/bin/python -m bench.inproc --stream           # the same with "stream": true (20 chunks, no gap)
    .venv/bin/python -m bench.inproc --profile          # then cProfile 1,000 more gateway requests (top 40)
    .venv/bin/python -m bench.inproc --code /tmp/old   # another commit's gateway: a `git worktree add /tmp/old REV`

The gateway is built with ``create_app()`` exactly as :mod:`bench.run` configures it (a paid model on the mock
upstream, SQLite ledger and rate-limit counters, a key with every limit on) and called as a WSGI app, without a
server or a test client, so the figures are what the gateway's own code costs per request, and nothing else; the
bare pass-through (:mod:`bench.bare_passthrough`) runs in the same process against the same mock as a check of
the machine. Batches of the two alternate; the report gives the median of the batches' process CPU and wall time
per request, in microseconds. The mock upstream is :mod:`bench.targets`' (its log in the temporary folder); the
access log lines go to stderr (send them to /dev/null).

No gunicorn and no gevent here: :mod:`bench.run` measures those. Use this one to compare two versions of the
request path on a noisy machine (process CPU varies less than latency) and to profile it.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .targets import Processes
from .targets import boundless_env
from .targets import create_key
from .targets import start_mock

BODY = {"model": "bench-paid", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64}


def _environ(path: str, body: bytes, headers: dict[str, str]) -> dict:
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "50000", "HTTP_HOST": "127.0.0.1:8000",
        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0), "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
    }
    environ.update(headers)
    return environ


def _caller(app, path: str, body: bytes, headers: dict[str, str]):
    """A function that makes one request to ``app`` and checks that it was answered 200."""
    def call() -> None:
        status = []
        result = app(_environ(path, body, headers), lambda s, h, exc=None: status.append(s))
        try:
            for _ in result:
                pass
        finally:
            if hasattr(result, "close"):
                result.close()
        if not status[0].startswith("200"):
            raise RuntimeError(f"{path} answered {status[0]}")
    return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per batch (1000)")
    parser.add_argument("--batches", type=int, default=5, help="batches of each (5)")
    parser.add_argument("--stream", action="store_true", help='"stream": true (20 chunks, no gap between them)')
    parser.add_argument("--profile", action="store_true", help="then cProfile one batch of the gateway's")
    parser.add_argument("--top", type=int, default=40, help="rows of the profile (40)")
    parser.add_argument("--code", type=Path, help="the checkout whose app/ to measure (default: this one)")
    args = parser.parse_args(argv)
    if args.code:                      # that commit's app/ (and its CLI's schema), not this checkout's
        sys.path.insert(0, str(args.code.resolve()))
        os.environ["PYTHONPATH"] = str(args.code.resolve())

    home = Path(tempfile.mkdtemp(prefix="boundless-inproc-"))
    procs = Processes(home, None)
    try:
        _, port = start_mock(procs, gap=0)
        env = boundless_env(home, port, None)
        os.environ.update({k: v for k, v in env.items() if k.startswith("BOUNDLESS_")})
        key = create_key(dict(os.environ))

        from app import create_app          # after the environment is set: create_app reads it
        from . import bare_passthrough
        bare_passthrough.UPSTREAM = f"http://127.0.0.1:{port}/v1"
        body = dict(BODY, stream=True) if args.stream else BODY
        raw = json.dumps(body).encode()
        gateway = _caller(create_app(), "/api/v1/chat/completions", raw, {"HTTP_AUTHORIZATION": f"Bearer {key}"})
        bare = _caller(bare_passthrough.app, "/v1/chat/completions", raw, {})

        for call in (gateway, bare):       # warm up: connections, caches, the writer's statements
            for _ in range(300):
                call()
        results: dict[str, list[tuple[float, float]]] = {"gateway": [], "bare": []}
        for _ in range(args.batches):
            for name, call in (("gateway", gateway), ("bare", bare)):
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(args.requests):
                    call()
                results[name].append(((time.perf_counter() - wall) / args.requests * 1e6,
                                      (time.process_time() - cpu) / args.requests * 1e6))
        what = "stream (20 chunks)" if args.stream else "JSON"
        print(f"paid {what} chat request, in-process, {args.batches} x {args.requests}; µs per request, median of "
              f"the batches (each batch's CPU in brackets)")
        for name, rows in results.items():
            cpus = sorted(round(c) for _, c in rows)
            print(f"  {name:8s} CPU {statistics.median(c for _, c in rows):7.0f}   wall "
                  f"{statistics.median(w for w, _ in rows):7.0f}   {cpus}")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.requests):
                gateway()
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(args.top)
    finally:
        procs.close()


if __name__ == "__main__":
    main()

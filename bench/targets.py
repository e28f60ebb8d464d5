"""The servers the benchmark measures, and the process handling that starts and always stops them.

Every subprocess runs in its own process group (``start_new_session``), optionally pinned to some CPUs with
``taskset``, with its output in a log file of the run's temporary folder. :class:`Processes` kills every group
it started (SIGTERM, then SIGKILL after a few seconds) when it is closed, whatever happened before.

Targets (all forwarding to the same mock upstream):

* ``direct``: the mock itself, the floor;
* ``nginx``: ``proxy_pass`` with upstream keep-alive and no buffering;
* ``bare``: :mod:`bench.bare_passthrough` under gunicorn with the shipped ``gunicorn.conf.py``'s settings
  (:file:`bench/gunicorn_bare.conf.py`: the same values, without the gateway's server hooks);
* ``boundless-gthread`` / ``boundless-gevent``: the real gateway (``wsgi:app``), every feature on: key auth,
  SQLite rate-limit counters, credit billing on a paid model;
* ``litellm``: the LiteLLM proxy from its own virtualenv (see :func:`setup_litellm`), 2 uvicorn workers.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import venv
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LITELLM_VENV = REPO / "bench" / ".litellm-venv"
LITELLM_SPEC = "litellm[proxy]"
NGINX = "/usr/sbin/nginx"
#: The paid model of the catalogue, its upstream name at the mock, and the key's generous allowances.
MODEL = "bench-paid"
KEY_ALLOWANCE = "100000000"

TARGET_NAMES = ("direct", "nginx", "bare", "boundless-gthread", "boundless-gevent", "litellm")
#: The gateway at another commit (``bench.run --baseline REV``), for before/after from the same run.
BASELINE = "boundless-baseline"


class TargetError(Exception):
    """A target could not be installed, started or verified; the run goes on without it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any BOUNDLESS_*/LITELLM_*/proxy settings, plus ``extra``."""
    drop = ("BOUNDLESS_", "LITELLM_", "BENCH_", "DATABASE_URL")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(drop) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(extra)
    return env


class Processes:
    """Starts subprocesses in their own process groups and guarantees they are all stopped on :meth:`close`."""

    def __init__(self, workdir: Path, cpus: str | None) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path = REPO) -> subprocess.Popen:
        """Start ``argv`` (pinned to the server CPUs if any), output to ``<workdir>/<name>.log``."""
        if self.cpus is not None:
            argv = ["taskset", "-c", self.cpus, *argv]
        with open(self.log_path(name), "ab") as log:
            proc = subprocess.Popen(argv, cwd=cwd, env=env or _clean_env(), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        """SIGTERM the process's group, SIGKILL it after ``grace`` seconds; reap the leader."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            try:                         # the leader is gone; finish off any straggler of its group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


@dataclass
class Target:
    """A server under test: where to send requests and which process tree to measure."""

    name: str
    port: int
    proc: subprocess.Popen              # root of the tree whose CPU time and RSS are measured
    prefix: str                         # "/v1" or "/api/v1"
    headers: dict[str, str] = field(default_factory=dict)
    capacity: bool = False              # also run the open-streams capacity test
    log: str = ""                       # log name in the work folder


# --------------------------------------------------------------------------- starters


def start_mock(procs: Processes, timeout: float = 15.0, gap: float = 0.005) -> tuple[subprocess.Popen, int]:
    """The fast mock upstream (20 chunks ``gap`` seconds apart, no delay; slow points use per-request knobs)."""
    port = free_port()
    proc = procs.spawn("mock", [sys.executable, "-m", "bench.mock_upstream", "--host", "127.0.0.1",
                                "--port", str(port), "--chunks", "20", "--gap", str(gap), "--no-record"])
    _wait_log(procs, "mock", proc, r"listening on http://127\.0\.0\.1:\d+", timeout)
    return proc, port


def direct(mock: subprocess.Popen, mock_port: int) -> Target:
    return Target("direct", mock_port, mock, "/v1", capacity=True, log="mock")


def start_nginx(procs: Processes, mock_port: int) -> Target:
    home = procs.workdir / "nginx"
    (home / "temp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = home / "nginx.conf"
    conf.write_text(f"""\
daemon off;
worker_processes 1;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log {home}/access.log combined buffer=256k flush=1s;
    client_body_temp_path {home}/temp/body;
    proxy_temp_path {home}/temp/proxy;
    fastcgi_temp_path {home}/temp/fastcgi;
    uwsgi_temp_path {home}/temp/uwsgi;
    scgi_temp_path {home}/temp/scgi;
    keepalive_requests 1000000;
    upstream mock {{
        server 127.0.0.1:{mock_port};
        keepalive 512;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
""")
    proc = procs.spawn("nginx", [NGINX, "-p", str(home), "-c", str(conf), "-e", str(home / "error.log")])
    return Target("nginx", port, proc, "/v1", log="nginx")


def _gunicorn(procs: Processes, name: str, conf: str, app: str,
              env: dict[str, str], cwd: Path = REPO) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = [str(VENV_BIN / "gunicorn"), "-c", conf, "--no-control-socket", "-b", f"127.0.0.1:{port}", app]
    return procs.spawn(name, argv, env, cwd), port


def start_bare(procs: Processes, mock_port: int) -> Target:
    proc, port = _gunicorn(procs, "bare", "bench/gunicorn_bare.conf.py", "bench.bare_passthrough:app",
                           _clean_env(BENCH_UPSTREAM=f"http://127.0.0.1:{mock_port}/v1"))
    return Target("bare", port, proc, "/v1", log="bare")


def boundless_env(home: Path, mock_port: int, worker_class: str | None) -> dict[str, str]:
    """The gateway's environment: a catalogue with one paid model on the mock, SQLite everything, all files
    (database, rate-limit counters, metrics) in ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    catalogue = home / "catalogue.toml"
    catalogue.write_text(f"""\
[limits]
rpm = 20
rpd = 50

[providers.mock]
base_url = "http://127.0.0.1:{mock_port}/v1"

[models."{MODEL}"]
provider = "mock"
upstream_model = "mock-model"
input_price = 1
output_price = 2
""")
    env = _clean_env(BOUNDLESS_CONFIG=str(catalogue), BOUNDLESS_DATABASE_URL=f"sqlite:///{home / 'b.db'}",
                     BOUNDLESS_INSTANCE_DIR=str(home), BOUNDLESS_METRICS_DIR=str(home / "metrics"))
    if worker_class:
        env["BOUNDLESS_WORKER_CLASS"] = worker_class
    return env


def start_boundless(procs: Processes, mock_port: int, worker_class: str | None,
                    name: str | None = None, code: Path = REPO) -> Target:
    """The gateway from ``code`` (this checkout, or a worktree of another commit) with every feature on;
    ``worker_class`` None keeps the one that code's ``gunicorn.conf.py`` ships."""
    name = name or f"boundless-{worker_class}"
    env = boundless_env(procs.workdir / name, mock_port, worker_class)
    if code != REPO:                     # import that commit's app/, not this checkout's (editable install)
        env["PYTHONPATH"] = str(code)
    key = create_key(env, code)
    proc, port = _gunicorn(procs, name, "gunicorn.conf.py", "wsgi:app", env, code)
    return Target(name, port, proc, "/api/v1", {"Authorization": f"Bearer {key}"}, capacity=True, log=name)


def create_key(env: dict[str, str], code: Path = REPO) -> str:
    """The benchmark's key (``bench``, every limit and its credit far beyond any run), made with the CLI of
    ``code`` in the gateway's environment ``env``."""
    created = subprocess.run(
        [str(VENV_BIN / "boundless"), "keys", "create", "--name", "bench", "--rpm", KEY_ALLOWANCE,
         "--rpd", KEY_ALLOWANCE, "--credit", KEY_ALLOWANCE],
        cwd=code, env=env, capture_output=True, text=True, timeout=60)
    key = created.stdout.strip().splitlines()[-1] if created.stdout.strip() else ""
    if created.returncode or not key.startswith("sk-"):
        raise TargetError(f"boundless keys create failed: {created.stderr.strip()[-500:]}")
    return key


def start_baseline(procs: Processes, mock_port: int, rev: str) -> Target:
    """The gateway at commit ``rev``, checked out with ``git worktree`` into the run's work folder (removed
    again by :func:`remove_baseline`), run exactly as :func:`start_boundless` runs this checkout."""
    tree = procs.workdir / "baseline"
    out = subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise TargetError(f"git worktree add {rev} failed: {out.stderr.strip()[-300:]}")
    return start_boundless(procs, mock_port, None, BASELINE, tree)


def remove_baseline(procs: Processes) -> None:
    tree = procs.workdir / "baseline"
    if tree.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True,
                       timeout=60)


def start_litellm(procs: Processes, mock_port: int) -> Target:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        raise TargetError(f"{exe} is missing: install it first with `.venv/bin/python -m bench.run --setup-litellm`")
    home = procs.workdir / "litellm"
    home.mkdir(parents=True, exist_ok=True)
    master_key = "sk-bench-" + os.urandom(16).hex()
    # JSON is YAML: the config needs no YAML library here.
    (home / "config.yaml").write_text(json.dumps({
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": "openai/mock-model", "api_base": f"http://127.0.0.1:{mock_port}/v1", "api_key": "x"}}],
        "litellm_settings": {"telemetry": False, "success_callback": [], "failure_callback": [], "callbacks": []},
        "general_settings": {"master_key": master_key},
    }, indent=2))
    # uvicorn's per-request access log off, as the gateway's (gunicorn accesslog) is by default.
    (home / "logging.json").write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
        "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "INFO"},
                    "uvicorn.access": {"handlers": ["stderr"], "level": "WARNING", "propagate": False}},
    }))
    port = free_port()
    env = _clean_env(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False",
                     ANONYMIZED_TELEMETRY="False")
    proc = procs.spawn("litellm", [
        str(exe), "--config", str(home / "config.yaml"), "--host", "127.0.0.1", "--port", str(port),
        "--num_workers", "2", "--timeout_worker_healthcheck", "300", "--log_config", str(home / "logging.json")],
        env)
    return Target("litellm", port, proc, "/v1", {"Authorization": f"Bearer {master_key}"}, log="litellm")


def _wait_log(procs: Processes, name: str, proc: subprocess.Popen, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, procs.log_tail(name, 50)):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise TargetError(f"{name} did not start:\n{procs.log_tail(name)}")


# --------------------------------------------------------------------------- LiteLLM install


def setup_litellm() -> str:
    """(Re)create ``bench/.litellm-venv`` and pip-install LiteLLM's proxy into it; return its version."""
    print(f"creating {LITELLM_VENV} and installing {LITELLM_SPEC!r} (a few minutes) ...", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(LITELLM_VENV)
    pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, LITELLM_SPEC], check=True)
    return litellm_version() or "?"


def litellm_version() -> str | None:
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or None

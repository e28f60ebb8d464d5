"""gunicorn settings for Boundless. Every value can be overridden by gunicorn's own flags (-b, -w, -k ...)
or by the environment variables named here. This file must not import ``app`` (the master reads it)."""
import os
import subprocess
import sys
import uuid

#: Where to listen. Behind nginx keep 127.0.0.1.
bind = os.environ.get("BOUNDLESS_BIND", "127.0.0.1:8000")
#: One worker per core: the work is I/O-bound and each worker serves many requests at once.
workers = int(os.environ.get("BOUNDLESS_WORKERS", "2"))
#: gevent: one greenlet per in-flight request, so an open stream costs a few KiB and no thread; up to
#: workers x worker_connections requests (and streams) at once. gthread (one OS thread per request,
#: workers x threads of them) also works; see README "Worker class" and docs/benchmarks.md for both.
worker_class = os.environ.get("BOUNDLESS_WORKER_CLASS", "gevent")
#: gthread only: threads per worker.
threads = int(os.environ.get("BOUNDLESS_THREADS", "64"))
#: Connections per worker (gevent; gthread too), open streams and idle keep-alive ones included.
worker_connections = int(os.environ.get("BOUNDLESS_WORKER_CONNECTIONS", "1000"))
#: A heartbeat (a worker whose loop is stuck this long is restarted), not a limit on a stream's length.
timeout = int(os.environ.get("BOUNDLESS_TIMEOUT", "60"))
#: On SIGTERM/HUP, open streams get this long to finish.
graceful_timeout = int(os.environ.get("BOUNDLESS_GRACEFUL_TIMEOUT", "90"))
keepalive = int(os.environ.get("BOUNDLESS_KEEPALIVE", "5"))
#: gunicorn >= 25.1 opens a control socket per instance by default; we do not use it.
control_socket_disable = True
#: Trust X-Forwarded-* only from a local nginx.
forwarded_allow_ips = os.environ.get("BOUNDLESS_FORWARDED_ALLOW_IPS", "127.0.0.1")
accesslog = os.environ.get("BOUNDLESS_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("BOUNDLESS_LOG_LEVEL", "info")


def on_starting(server):
    """Check the settings; create an empty database once, before the workers would race to; settle what a
    previous run left in flight (a crash, a kill -9)."""
    _refuse_memory_storage(server)
    _metrics_dir()
    # One id per running gateway, inherited by its workers: held ledger rows say "<id>:<pid>".
    os.environ.setdefault("BOUNDLESS_INSTANCE_ID", uuid.uuid4().hex[:16])
    _recover(wait=True)


def post_worker_init(worker):
    """The first worker prints the start-up summary (app/server/startup.py: catalogue, database, counters,
    workers, providers without a key). Cut the streams still open just before the graceful deadline, so each
    is settled and logged; beat, so that if this worker dies its held requests are found and settled."""
    from app.server.lifecycle import freeze_startup_objects
    from app.server.lifecycle import install_graceful_stop
    from app.server.lifecycle import start_heartbeat
    if worker.age == 1:      # the first worker of this start (ages count up from 1): say once what was loaded
        from app.server.startup import print_summary
        print_summary(worker)
    install_graceful_stop(worker)
    start_heartbeat()
    freeze_startup_objects()


def child_exit(server, worker):
    """A worker is gone (also after kill -9): settle the requests it still held."""
    _recover("--owner", f"{os.environ['BOUNDLESS_INSTANCE_ID']}:{worker.pid}")
    _metrics_worker_gone(worker.pid)


def on_exit(server):
    """Remove the metrics directory if on_starting made it (a temp dir)."""
    _metrics_cleanup()


def _recover(*args, wait=False):
    # In a child process, so that the master never imports the app (gevent workers patch modules after
    # the fork) nor holds a database connection across forks. Idempotent; only the first run is waited for.
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "db", "recover", *args],
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    if wait:
        proc.wait(timeout=120)


def _refuse_memory_storage(server):
    """Refuse per-process counters with several workers: each worker would count on its own (N x the limit)."""
    storage = os.environ.get("BOUNDLESS_RATELIMIT_STORAGE", "")
    if storage.startswith("memory://") and server.cfg.workers > 1:
        raise SystemExit(
            f"BOUNDLESS_RATELIMIT_STORAGE=memory:// keeps counters inside each process, so with "
            f"{server.cfg.workers} workers every key would get {server.cfg.workers}x its limits. Use the default "
            f"SQLite storage (unset the variable), memcached:// or redis://, or run one worker (-w 1).")


#: Names the temp metrics directory this master made, as "pid:path" (kept in the environment, so that it
#: survives a config reload on HUP; the pid check keeps workers and a re-exec'd master from removing it).
_METRICS_TMP = "BOUNDLESS_METRICS_TMP"


def _metrics_dir():
    """Workers add up their metrics in files under PROMETHEUS_MULTIPROC_DIR (prometheus-client multiprocess
    mode): BOUNDLESS_METRICS_DIR, emptied of old files, or a fresh temp dir. Set before the workers fork and
    before prometheus_client is imported anywhere in this process (it reads the variable on import)."""
    path = os.environ.get("BOUNDLESS_METRICS_DIR", "")
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.remove(os.path.join(path, name))
    else:
        import tempfile
        path = tempfile.mkdtemp(prefix="boundless-metrics-")
        os.environ[_METRICS_TMP] = f"{os.getpid()}:{path}"
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def _metrics_worker_gone(pid):
    """Drop the dead worker's live gauges (open streams); its counters stay, they are history."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        try:
            from prometheus_client import multiprocess
            multiprocess.mark_process_dead(pid)
        except Exception as err:   # never let metrics bookkeeping take the master down
            print(f"boundless: could not mark worker {pid} dead in the metrics: {err}", file=sys.stderr)


def _metrics_cleanup():
    owner, _, path = os.environ.get(_METRICS_TMP, "").partition(":")
    if path and owner == str(os.getpid()):
        import shutil
        shutil.rmtree(path, ignore_errors=True)

"""gunicorn settings for Boundless. Every value can be overridden by gunicorn's own flags (-b, -w, -k ...)
or by the environment variables named here. This file must not import ``app`` (the master reads it)."""
import os
import subprocess
import sys

#: Where to listen. Behind nginx keep 127.0.0.1.
bind = os.environ.get("BOUNDLESS_BIND", "127.0.0.1:8000")
#: One worker per core: the work is I/O-bound and each worker serves many requests at once.
workers = int(os.environ.get("BOUNDLESS_WORKERS", "2"))
#: gthread: one thread per in-flight request; a stream holds its thread while it sleeps in recv, so
#: workers x threads is the number of concurrent requests (and streams). See README "Worker class".
worker_class = os.environ.get("BOUNDLESS_WORKER_CLASS", "gthread")
threads = int(os.environ.get("BOUNDLESS_THREADS", "64"))
#: Connections per worker, open streams and idle keep-alive ones included.
worker_connections = int(os.environ.get("BOUNDLESS_WORKER_CONNECTIONS", "1000"))
#: For gthread this is a heartbeat, not a limit on a stream's length.
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
    """Check the settings, then settle what a previous run left in flight (a crash, a kill -9)."""
    _refuse_memory_storage(server)
    _recover()


def post_worker_init(worker):
    """Cut the streams still open just before the graceful deadline, so each is settled and logged."""
    from app.lifecycle import install_graceful_stop
    install_graceful_stop(worker)


def child_exit(server, worker):
    """A worker is gone (also after kill -9): settle the requests it still held."""
    _recover("--pid", str(worker.pid))


def _recover(*args):
    # In a child process, so that the master never imports the app (gevent workers patch modules after
    # the fork) nor holds a database connection across forks. Nothing to wait for: it is idempotent.
    subprocess.Popen([sys.executable, "-m", "app.cli", "db", "recover", *args], cwd=os.path.dirname(__file__))


def _refuse_memory_storage(server):
    """Refuse per-process counters with several workers: each worker would count on its own (N x the limit)."""
    storage = os.environ.get("BOUNDLESS_RATELIMIT_STORAGE", "")
    if storage.startswith("memory://") and server.cfg.workers > 1:
        raise SystemExit(
            f"BOUNDLESS_RATELIMIT_STORAGE=memory:// keeps counters inside each process, so with "
            f"{server.cfg.workers} workers every key would get {server.cfg.workers}x its limits. Use the default "
            f"SQLite storage (unset the variable), memcached:// or redis://, or run one worker (-w 1).")

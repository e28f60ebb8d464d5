"""gunicorn settings for :mod:`bench.bare_passthrough`: exactly the shipped ``gunicorn.conf.py``'s settings
(workers, worker class, threads, connections, timeouts, keep-alive, logging; the same ``BOUNDLESS_*``
variables), without its server hooks, which start the gateway's own start-up, recovery and metrics work and
need the gateway app."""
import runpy
from pathlib import Path

_shipped = runpy.run_path(str(Path(__file__).resolve().parent.parent / "gunicorn.conf.py"))
globals().update({name: value for name, value in _shipped.items()
                  if not name.startswith("_") and isinstance(value, (str, int, float, bool, type(None)))})

"""
app.server
~~~~~~~~~~

Process life and what an operator watches: gunicorn's per-worker setup and the recovery of dead workers'
requests (``lifecycle``), ``/healthz`` and ``/readyz`` (``health``), Prometheus metrics (``metrics``), the JSON
request log (``logs``), the one report per request they both consume (``reporting``), and the trusted
``X-Forwarded-For`` hop (``forwarded``).

Top layer, beside ``app.api``: may import every area below (``app.accounting``, ``app.store``, ``app.state``).
Nothing below imports it.
"""

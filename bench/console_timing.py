"""Time the ledger's readers on a seeded database (docs/benchmarks.md, "The ledger at scale").

Builds the app on ``--database-url`` (seed it first with ``python -m bench.seed_ledger``) and times, in this
process through Flask's test client: the console overview, a key's page (the busiest key), the usage report of
the admin API over 90 days by day, model and key, and ``boundless usage`` (the CLI's function, by day over the
whole ledger, in this process: a subprocess would add the interpreter's start). Median and max of ``-n`` calls,
in ms. Nothing is written to the ledger; a console user and an admin key are added.

    python -m bench.console_timing --database-url sqlite:///bench/results/ledger-1765000000.db
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(url: str):
    from app import create_app
    from app.store.models import db

    app = create_app({"TESTING": True, "BOUNDLESS_DATABASE_URL": url,
                      "BOUNDLESS_CONFIG": str(ROOT / "config" / "offline.toml"),
                      "BOUNDLESS_SECRET_KEY": "bench-secret-" + "x" * 32,
                      "BOUNDLESS_RATELIMIT_STORAGE": "memory://"})
    from app import console_users
    from app import keys
    from app.store.models import ApiKey
    with app.app_context(), db.connection_context():
        console_users.set_password("bench", "bench password long enough")
        user = console_users.check("bench", "bench password long enough")
        admin_name = f"bench-admin-{os.getpid()}"
        admin_key = keys.create(admin_name, admin=True)
        busiest = ApiKey.select(ApiKey.name).where(ApiKey.admin == False).order_by(ApiKey.spent.desc()).first().name  # noqa: E712
    db.close()
    logging.getLogger("boundless").setLevel(logging.WARNING)     # no access log line per call
    return app, user, admin_key, busiest


def timed(fn, n: int) -> tuple[float, float]:
    fn()                                    # warm: the first call loads templates and pages
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), max(times)


def run(url: str, n: int) -> list[tuple[str, float, float]]:
    app, user, admin_key, busiest = build(url)
    client = app.test_client()
    with client.session_transaction() as session:
        session["uid"], session["user"] = user.id, user.name
    auth = {"Authorization": f"Bearer {admin_key}"}
    since = (datetime.datetime.now(datetime.timezone.utc).date() - datetime.timedelta(days=90)).isoformat()

    def get(path, headers=None):
        def call():
            resp = client.get(path, headers=headers)
            assert resp.status_code == 200, (path, resp.status_code, resp.get_data(as_text=True)[:300])
        return call

    def cli_usage():
        from click.testing import CliRunner
        from app.cli import main
        result = CliRunner().invoke(main, ["usage", "--by", "day"], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    os.environ["BOUNDLESS_DATABASE_URL"] = url
    os.environ["BOUNDLESS_CONFIG"] = str(ROOT / "config" / "offline.toml")
    points = [("console overview", get("/console/")),
              (f"console key page ({busiest})", get(f"/console/key?name={busiest}")),
              ("GET /api/v1/usage?by=day (90 days)", get(f"/api/v1/usage?by=day&since={since}", auth)),
              ("GET /api/v1/usage?by=model (90 days)", get(f"/api/v1/usage?by=model&since={since}", auth)),
              ("GET /api/v1/usage?by=key (90 days)", get(f"/api/v1/usage?by=key&since={since}", auth)),
              ("boundless usage (by day, all)", cli_usage)]
    return [(name, *timed(fn, n)) for name, fn in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("-n", type=int, default=5, help="calls per point (default 5)")
    args = parser.parse_args()
    os.environ.setdefault("BOUNDLESS_INSTANCE_ID", "bench")
    rows = run(args.database_url, args.n)
    print(f"| {args.database_url.split('://')[0]} | median ms | max ms |\n|---|---:|---:|")
    for name, med, worst in rows:
        print(f"| {name} | {med:.0f} | {worst:.0f} |")


if __name__ == "__main__":
    main()

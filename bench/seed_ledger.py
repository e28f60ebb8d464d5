"""Fill a database with a big settled ledger, to time the reports on it (docs/benchmarks.md, "The ledger at scale").

500 keys and 1,000,000 settled ledger rows spread evenly over the last 90 days (UTC), a mix of models, a few
estimated charges and failed outcomes. The ledger identity holds (each key's opening credit = its charges +
its balance; spent = its charges), so the gateway and ``boundless`` run on the result as on any database.

Bulk inserts: one transaction per batch of rows, ``executemany`` on SQLite and MySQL, ``execute_values`` on
PostgreSQL. The schema is created at the current version first (``--schema-version 5`` is not offered: seed,
then time before and after a change on the same rows by checking out the old code).

    python -m bench.seed_ledger                                   # a new SQLite file under bench/results/
    python -m bench.seed_ledger --database-url postgresql://postgres@127.0.0.1:5432/bl_scale_x
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import random
import time
from pathlib import Path

#: (model, weight, micro-credits per prompt token, per completion token)
MODELS = (("gpt-4o-mini", 40, 1, 4), ("gpt-4o", 15, 25, 100), ("claude-3-5-sonnet", 12, 30, 150),
          ("llama-3.1-70b", 15, 5, 5), ("mistral-small", 10, 2, 6), ("text-embedding-3-small", 8, 1, 0))
#: (outcome, status, weight): most requests complete
OUTCOMES = (("complete", 200, 970), ("upstream_error", 502, 12), ("client_closed", 200, 10),
            ("upstream_cut", 200, 5), ("lost", None, 3))
BATCH = 5000
COLUMNS = ("request_id", "key_id", "model", "created_at", "state", "stream", "reserved", "charge",
           "prompt_tokens", "completion_tokens", "estimated", "status", "outcome", "latency_ms", "ttfb_ms", "owner")


def default_url() -> str:
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    return f"sqlite:///{results / f'ledger-{int(time.time())}.db'}"


def seed(url: str, keys: int = 500, rows: int = 1_000_000, days: int = 90, seed_value: int = 18) -> dict:
    """Create the schema on ``url`` and fill it; return {keys, rows, seconds}."""
    from app.store import schema
    from app.store.models import db
    from app.store.models import make_database

    rnd = random.Random(seed_value)
    database = make_database(url)
    db.initialize(database)
    started = time.perf_counter()
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None, microsecond=0)
    first = now - datetime.timedelta(days=days)
    span = int((now - first).total_seconds())
    with db.connection_context():
        schema.create(database)
        conn = database.connection()
        sqlite = url.startswith("sqlite")
        postgres = url.startswith("postgres")
        p = database.param
        q = database.quote[0] + "{}" + database.quote[1]
        with database.atomic():
            cur = conn.cursor()
            key_rows = [(f"team-{i:03d}", hashlib.sha256(f"seed-{i}".encode()).hexdigest(), "sk-seed",
                         0, 0, first - datetime.timedelta(days=1)) for i in range(keys)]
            cur.executemany(f"INSERT INTO {q.format('api_key')} (name, key_hash, prefix, balance, spent, created_at, "
                            f"revoked, disabled, budget_spent, admin) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, "
                            f"{'FALSE, FALSE, 0, FALSE' if postgres else '0, 0, 0, 0'})", key_rows)
            cur.execute(f"SELECT id FROM {q.format('api_key')} ORDER BY id")
            key_ids = [r[0] for r in cur.fetchall()]
        # a few busy keys, many quiet ones
        key_weights = [1.0 / (1 + i) ** 0.8 for i in range(keys)]
        spent = dict.fromkeys(key_ids, 0)
        model_names = [m[0] for m in MODELS]
        model_weights = [m[1] for m in MODELS]
        prices = {m[0]: (m[2], m[3]) for m in MODELS}
        outcomes = [o[:2] for o in OUTCOMES]
        outcome_weights = [o[2] for o in OUTCOMES]
        insert = (f"INSERT INTO {q.format('usage')} ({', '.join(q.format(c) for c in COLUMNS)}) VALUES "
                  + ("%s" if postgres else f"({', '.join([p] * len(COLUMNS))})"))
        done = 0
        while done < rows:
            n = min(BATCH, rows - done)
            picked_keys = rnd.choices(key_ids, key_weights, k=n)
            picked_models = rnd.choices(model_names, model_weights, k=n)
            picked_outcomes = rnd.choices(outcomes, outcome_weights, k=n)
            batch = []
            for j in range(n):
                key_id, model = picked_keys[j], picked_models[j]
                outcome, status = picked_outcomes[j]
                prompt = rnd.randint(20, 3000)
                completion = 0 if model.startswith("text-embedding") or outcome == "upstream_error" \
                    else rnd.randint(5, 800)
                estimated = outcome in ("client_closed", "upstream_cut", "lost")
                pp, cp = prices[model]
                charge = prompt * pp + completion * cp if outcome != "upstream_error" else 0
                reserved = charge + rnd.randint(0, 50_000)
                spent[key_id] += charge
                created = first + datetime.timedelta(seconds=(done + j) * span // rows)
                batch.append((f"req_seed{done + j:09d}", key_id, model, created, "settled", rnd.random() < 0.6,
                              reserved, charge, prompt, completion, estimated, status, outcome,
                              rnd.uniform(200, 4000), rnd.uniform(50, 800), ""))
            with database.atomic():
                if postgres:
                    from psycopg2.extras import execute_values
                    execute_values(conn.cursor(), insert, batch, page_size=1000)
                else:
                    conn.cursor().executemany(insert, batch)
            done += n
        with database.atomic():
            cur = conn.cursor()
            balances = {k: 1_000_000_000 + rnd.randint(0, 10_000_000) for k in key_ids}
            cur.executemany(f"UPDATE {q.format('api_key')} SET balance = {p}, spent = {p} WHERE id = {p}",
                            [(balances[k], spent[k], k) for k in key_ids])
            cur.executemany(f"INSERT INTO {q.format('credit_entry')} (key_id, amount, kind, created_at) "
                            f"VALUES ({p}, {p}, 'open', {p})",
                            [(k, balances[k] + spent[k], first - datetime.timedelta(days=1)) for k in key_ids])
            schema.fill_usage_day(database)           # the daily roll-up, as `db upgrade` fills it
        if sqlite or postgres:
            database.execute_sql("ANALYZE")
    database.close()
    return {"keys": keys, "rows": rows, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=None, help="default: a new SQLite file under bench/results/")
    parser.add_argument("--keys", type=int, default=500)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90)
    args = parser.parse_args()
    url = args.database_url or default_url()
    result = seed(url, args.keys, args.rows, args.days)
    print(f"{url}: {result['keys']} keys, {result['rows']} ledger rows in {result['seconds']} s")


if __name__ == "__main__":
    main()

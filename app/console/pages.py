"""
app.console.pages
~~~~~~~~~~~~~~~~~

The console's report pages: the overview, the usage report, the ledger, providers and the audit log. They
read through app/accounting/reports.py, the same queries as ``boundless usage`` and the admin API.
"""
from __future__ import annotations


from flask import Response
from flask import render_template
from flask import request

from . import bp
from .charts import bars
from .views import days_from
from .views import month_start
from .views import today
from .. import audit
from ..accounting import reports
from ..accounting.credits import amount
from ..accounting.credits import to_credits
from ..state import state
from ..upstream import routing


@bp.get("/")
def overview():
    since = month_start()
    by_day = {r.group: r for r in reports.usage("day", since=since)}
    series = days_from(since.date(), 30)
    now = by_day.get(today().isoformat()) or reports.UsageRow(None)
    month = reports.UsageRow(None)
    refused: dict[str, int] = {}
    for r in by_day.values():
        month.requests += r.requests
        month.prompt_tokens += r.prompt_tokens
        month.completion_tokens += r.completion_tokens
        month.charge += r.charge
        for reason, n in r.refused.items():
            refused[reason] = refused.get(reason, 0) + n
    errors = sorted({**{f"refused: {k}": v for k, v in refused.items()},
                     **{f"upstream: {k}": v for k, v in reports.failures(since).items()}}.items(),
                    key=lambda kv: -kv[1])
    top_keys = sorted(reports.usage("key", since=since), key=lambda r: -r.requests)[:10]
    top_models = sorted(reports.usage("model", since=since), key=lambda r: -r.requests)[:10]
    charts = {
        "requests": bars([(d[5:], by_day[d].requests if d in by_day else 0) for d in series],
                         "Requests per day, 30 days"),
        "credits": bars([(d[5:], float(to_credits(by_day[d].charge)) if d in by_day else 0) for d in series],
                        "Credits per day, 30 days", " credits"),
    }
    return render_template("console/overview.html", today=now, month=month, charts=charts, errors=errors,
                           top_keys=top_keys, top_models=top_models, amount=amount)


def _period(args) -> tuple:
    """The page's ``since``/``until`` filters: (since, until, None), or (None, None, what is wrong with them)."""
    try:
        return (reports.parse_moment(args.get("since", "").strip() or None),
                reports.parse_moment(args.get("until", "").strip() or None, end=True), None)
    except ValueError as err:
        return None, None, str(err)


@bp.get("/usage")
def usage_page():
    args = request.args
    by = args.get("by", "day") if args.get("by") in reports.GROUPS else "day"
    key_name, model = args.get("key", "").strip() or None, args.get("model", "").strip() or None
    since, until, error = _period(args)
    rows = reports.usage(by, key_name, model, since, until) if error is None else []
    if args.get("format") == "csv":
        return _csv_response(reports.usage_csv(rows, by), f"usage-by-{by}.csv")
    chart = bars([(str(r.group or "-"), r.requests) for r in rows[-60:]], f"Requests by {by}")
    return render_template("console/usage.html", rows=rows, by=by, chart=chart, error=error, amount=amount,
                           args=args, groups=reports.GROUPS)


@bp.get("/ledger")
def ledger_page():
    args = request.args
    since, until, error = _period(args)
    cursor = args.get("cursor", type=int)
    as_csv = args.get("format") == "csv"
    rows, after = ([], None) if error else reports.ledger(
        args.get("key", "").strip() or None, args.get("model", "").strip() or None,
        args.get("status", "").strip() or None, since, until, args.get("request_id", "").strip() or None,
        limit=10_000 if as_csv else 50, cursor=cursor)
    if as_csv:
        return _csv_response(reports.ledger_csv(rows), "ledger.csv")
    return render_template("console/ledger.html", rows=rows, after=after, args=args, error=error)


#: Audit entries per page.
AUDIT_PAGE = 100


@bp.get("/audit")
def audit_page():
    offset = max(0, request.args.get("offset", 0, type=int) or 0)
    target = request.args.get("target") or None
    entries = [audit.as_dict(e) for e in audit.recent(AUDIT_PAGE, offset, target=target)]
    return render_template("console/audit.html", entries=entries, offset=offset, page=AUDIT_PAGE, target=target)


@bp.get("/providers")
def providers_page():
    """The catalogue's providers and models, and every model's routes with their state as this worker sees
    them (``GET /api/v1/providers``'s view: app/upstream/routing.py ``health``)."""
    gw = state()
    cat = gw.catalog
    providers = [{"name": name, "models": sorted(m.id for m in cat.models.values() if m.provider.name == name)}
                 for name in sorted({m.provider.name for m in cat.models.values()})]
    health = routing.health(cat, gw.router.cooldowns)
    routes = [{"model": m["id"], **r, "fallbacks": m["fallback_models"]} for m in health["models"] for r in m["routes"]]
    return render_template("console/providers.html", providers=providers, routes=routes)


def _csv_response(text: str, filename: str) -> Response:
    resp = Response(text, mimetype="text/csv")
    resp.headers["Content-Disposition"] = f"attachment; filename={filename}"
    return resp


__all__ = ["audit_page", "ledger_page", "overview", "providers_page", "usage_page"]

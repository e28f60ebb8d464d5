"""
app.console.views
~~~~~~~~~~~~~~~~~

The console's request plumbing (sign-in, CSRF, security headers, error pages), its key pages and the key
holder's self-service page. The read-only report pages are in :mod:`.pages`.
"""
from __future__ import annotations

import datetime

from flask import Response
from flask import abort
from flask import flash
from flask import g
from flask import redirect
from flask import render_template
from flask import request
from flask import session
from flask import url_for
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from . import bp
from . import csrf
from . import limiter
from .charts import bars
from .. import console_users
from .. import keyops
from .. import keys
from ..accounting import reports
from ..errors import GatewayError
from ..state import state
from ..store.models import ApiKey

#: Endpoints anybody may open; every other console page needs a signed-in console user.
PUBLIC = {"console.signin", "console.static", "console.me", "console.me_signin", "console.me_signout"}

#: Labels and hints of the key fields in the forms (a field missing here shows its name).
FIELD_LABELS = {
    "rpm": ("Requests per minute", "a number, none (no limit) or default"),
    "rpd": ("Requests per day", "a number, none (no limit) or default"),
    "credit": ("Credit", "the balance, in credits"),
    "models": ("Models", "allowed model ids, comma-separated, * wildcards (* = every model)"),
    "expires": ("Expires", "an ISO date or datetime, or 30d, 12h ...; never on edit"),
    "budget": ("Budget", "credits per budget period, none on edit"),
    "budget_period": ("Budget period", "day, week or month"),
    "max_parallel": ("Max parallel", "requests in flight at once, none on edit"),
}

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

#: Sign-in throttling: failed attempts only (a 401 answer), per address and per user name.
SIGNIN_PER_USER = "5 per 15 minutes"
SIGNIN_PER_ADDRESS = "20 per 15 minutes"


def _failed(resp: Response) -> bool:
    return resp.status_code == 401


# --------------------------------------------------------------------------------------------------
# plumbing
# --------------------------------------------------------------------------------------------------

@bp.before_request
def _guard():
    if request.endpoint == "console.static":   # its CSS and script: public, and no session or database to read
        return None
    if request.method == "POST":
        csrf.protect()                         # raises CSRFError (400) without a valid token
    g.user = None
    if "uid" in session and console_users.exists(session["uid"], session.get("user", "")):
        g.user = session["user"]
    elif "uid" in session:                     # the user was removed: end the session
        session.pop("uid", None)
        session.pop("user", None)
    if request.endpoint not in PUBLIC and g.user is None:
        return redirect(url_for("console.signin", next=request.full_path.rstrip("?") if request.method == "GET" else None))
    return None


@bp.after_request
def _security_headers(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "console.static":
        resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.errorhandler(CSRFError)
def _csrf_error(err: CSRFError):
    return render_template("console/error.html", status=400, message="The form was not sent from this page or "
                           "has expired. Go back, reload the page and try again."), 400


@bp.errorhandler(429)
def _throttled(err: HTTPException):
    return render_template("console/error.html", status=429, message="Too many failed sign-in attempts. "
                           "Wait a few minutes and try again."), 429


@bp.errorhandler(GatewayError)
def _gateway_error(err: GatewayError):
    return render_template("console/error.html", status=err.status, message=err.message), err.status


@bp.errorhandler(404)
def _not_found(err: HTTPException):
    return render_template("console/error.html", status=404, message="There is no such page."), 404


def actor() -> str:
    return f"console:{g.user}"


# --------------------------------------------------------------------------------------------------
# sign-in
# --------------------------------------------------------------------------------------------------

@bp.route("/signin", methods=["GET", "POST"])
@limiter.limit(SIGNIN_PER_ADDRESS, methods=["POST"], deduct_when=_failed)
@limiter.limit(SIGNIN_PER_USER, methods=["POST"], deduct_when=_failed,
               key_func=lambda: "user:" + request.form.get("username", "").strip().lower())
def signin():
    if request.method == "GET":
        return render_template("console/signin.html", next=request.args.get("next", ""))
    user = console_users.check(request.form.get("username", "").strip(), request.form.get("password", ""))
    if user is None:
        return render_template("console/signin.html", error="Wrong name or password.",
                               next=request.form.get("next", "")), 401
    session.clear()                            # a new session: nothing from before the sign-in survives
    session.permanent = True
    session["uid"], session["user"] = user.id, user.name
    target = request.form.get("next", "")
    return redirect(target if target.startswith("/console/") and not target.startswith("//") else
                    url_for("console.overview"), code=303)


@bp.post("/signout")
def signout():
    session.clear()
    return redirect(url_for("console.signin"), code=303)


# --------------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------------

PAGE = 50


@bp.get("/keys")
def keys_page():
    search, kind = request.args.get("q", "").strip(), request.args.get("state", "")
    offset = max(0, request.args.get("offset", 0, type=int) or 0)
    rows, total = keyops.page(PAGE, offset, search, kind)
    defaults = _defaults()
    return render_template("console/keys.html", rows=[keyops.view(r, defaults) for r in rows], total=total,
                           offset=offset, page=PAGE, q=search, state=kind, fields=_fields())


@bp.post("/keys")
def create_key():
    form = {k: v.strip() for k, v in request.form.items() if k in keyops.FIELDS and v.strip()}
    tz = state().budget_tz
    key, row = keyops.create(actor(), request.form.get("name", ""), keyops.parse(form, update=False, tz=tz))
    return render_template("console/key_created.html", key=key, row=keyops.view(row, _defaults())), 201


@bp.get("/key")
def key_page():
    row = keyops.get(request.args.get("name", ""))
    info = keyops.view(row, _defaults())
    chart, by_model = _thirty_days(row.name, f"Requests of {row.name}, 30 days")
    ledger, _ = reports.ledger(key_id=row.id, limit=20)
    remaining = None
    if not row.revoked and not row.admin:
        remaining = state().limiter.peek(row.id, *state().limits_for(row))
    return render_template("console/key.html", key=info, chart=chart, ledger=ledger, remaining=remaining,
                           fields=_fields(), by_model=by_model)


@bp.post("/key/update")
def update_key():
    name = request.form.get("name", "")
    form = {k: v.strip() for k, v in request.form.items() if k in keyops.FIELDS and v.strip()}
    if not form:
        flash("Nothing to change.")
    else:
        tz = state().budget_tz
        keyops.change(actor(), name, keyops.parse(form, update=True, tz=tz), tz=tz)
        flash("Saved.")
    return redirect(url_for("console.key_page", name=name), code=303)


@bp.post("/key/topup")
def topup_key():
    name = request.form.get("name", "")
    row = keyops.topup(actor(), name, request.form.get("amount", "").strip())
    flash(f"Topped up: the balance is now {keyops.view(row)['balance']}.")
    return redirect(url_for("console.key_page", name=name), code=303)


@bp.post("/key/state")
def key_state():
    name, action = request.form.get("name", ""), request.form.get("action", "")
    if action == "revoke":
        keyops.revoke(actor(), name)
        flash("Revoked: the key is refused from its next request.")
    elif action in ("disable", "enable"):
        keyops.change(actor(), name, {"disabled": action == "disable"})
        flash("Disabled." if action == "disable" else "Enabled.")
    else:
        abort(400)
    return redirect(url_for("console.key_page", name=name), code=303)


# --------------------------------------------------------------------------------------------------
# self-service: a key holder's own page
# --------------------------------------------------------------------------------------------------

@bp.get("/me")
def me():
    row = _my_key()
    if row is None:
        return render_template("console/me_signin.html")
    chart, by_model = _thirty_days(row.name, "My requests, 30 days")
    remaining = state().limiter.peek(row.id, *state().limits_for(row))
    return render_template("console/me.html", key=keyops.view(row, _defaults()), chart=chart, remaining=remaining,
                           by_model=by_model)


@bp.post("/me")
@limiter.limit(SIGNIN_PER_ADDRESS, deduct_when=_failed)
def me_signin():
    presented = request.form.get("key", "").strip()
    row = (ApiKey.select().where((ApiKey.key_hash == keys.digest(presented)) & (ApiKey.revoked == False)  # noqa
                                 & (ApiKey.admin == False)).first() if presented else None)        # noqa: E712
    if row is None:
        return render_template("console/me_signin.html", error="This key is unknown or revoked."), 401
    session.clear()
    session["me"] = row.id
    return redirect(url_for("console.me"), code=303)


@bp.post("/me/signout")
def me_signout():
    session.pop("me", None)
    return redirect(url_for("console.me"), code=303)


def _my_key() -> ApiKey | None:
    key_id = session.get("me")
    if key_id is None:
        return None
    row = ApiKey.get_or_none((ApiKey.id == key_id) & (ApiKey.revoked == False))   # noqa: E712
    if row is None:
        session.pop("me", None)
    return row


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def _defaults() -> keyops.Defaults:
    return keyops.Defaults.of(state().catalog)


def _thirty_days(name: str, title: str) -> tuple[str, list]:
    """A key's page: its requests per day of the last 30 (an SVG bar chart) and its usage by model since then."""
    since = month_start()
    days = {r.group: r for r in reports.usage("day", name, since=since)}
    chart = bars([(d[5:], days[d].requests if d in days else 0) for d in days_from(since.date(), 30)], title)
    return chart, reports.usage("model", name, since=since)


def _fields() -> list[tuple[str, str, str]]:
    return [(name, *FIELD_LABELS.get(name, (name, ""))) for name in keyops.FIELDS]


def today() -> datetime.date:
    """Today in UTC, as the ledger counts days."""
    return datetime.datetime.now(datetime.timezone.utc).date()


def month_start() -> datetime.datetime:
    """The first midnight (UTC) of the last 30 days, today included."""
    return datetime.datetime.combine(today() - datetime.timedelta(days=29), datetime.time())


def days_from(first: datetime.date, n: int) -> list[str]:
    return [(first + datetime.timedelta(days=i)).isoformat() for i in range(n)]

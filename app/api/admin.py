"""
app.api.admin
~~~~~~~~~~~~~

The admin API under ``/api/v1`` (the shape of OpenRouter's provisioning keys): keys, usage, the ledger and
the audit log, for scripts and for anyone who would otherwise need a shell on the gateway's box.

Only admin keys (``boundless keys create --admin``) may call it: any other key gets 403 ``not_admin``, and an
admin key gets 403 ``admin_key`` everywhere else (app/api/__init__.py). Every change is written to the audit
log with the admin key's name, in the change's own transaction (app/keyops.py).
"""
from __future__ import annotations

from flask import Blueprint
from flask import Response
from flask import g
from flask import jsonify
from flask import request

from .. import audit
from .. import keyops
from ..accounting import reports
from ..accounting.billing import new_request_id
from ..auth import authenticate
from ..errors import InvalidRequest
from ..errors import NotFound
from ..errors import PermissionDenied
from ..jsonio import loads
from ..state import state
from ..store.models import ApiKey

bp = Blueprint("admin", __name__, url_prefix="/api/v1")


@bp.before_request
def _admin_only() -> None:
    g.request_id = new_request_id()
    key = authenticate()
    if not key.admin:
        raise PermissionDenied("This route is for admin keys (`boundless keys create --name NAME --admin`).",
                               code="not_admin")
    g.actor = f"key:{key.name}"


@bp.after_request
def _request_id(resp: Response) -> Response:
    resp.headers["X-Request-Id"] = g.get("request_id", "")
    resp.headers["Cache-Control"] = "no-store"
    return resp


# --------------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------------

@bp.get("/keys")
def list_keys() -> Response:
    limit, offset = _int_arg("limit", 100, 1, 1000), _int_arg("offset", 0, 0, 10**9)
    rows, total = keyops.page(limit, offset, request.args.get("search", ""), request.args.get("state", ""))
    return jsonify({"data": [keyops.view(r, _defaults()) for r in rows], "total": total, "limit": limit,
                    "offset": offset})


@bp.post("/keys")
def create_key() -> tuple[Response, int]:
    body = _json_body()
    tz = state().budget_tz
    key, row = keyops.create(g.actor, body.get("name"), keyops.parse(body, update=False, tz=tz))
    return jsonify({"data": {**keyops.view(row, _defaults()), "key": key}}), 201


@bp.get("/keys/<path:name>")
def get_key(name: str) -> Response:
    return jsonify({"data": keyops.view(keyops.get(name), _defaults())})


@bp.patch("/keys/<path:name>")
def update_key(name: str) -> Response:
    body = _json_body()
    if not body:
        raise InvalidRequest("nothing to change: give any of " + ", ".join(sorted({**keyops.FIELDS,
                                                                                **keyops.CHANGE_ONLY})))
    tz = state().budget_tz
    row = keyops.change(g.actor, name, keyops.parse(body, update=True, tz=tz), tz=tz)
    return jsonify({"data": keyops.view(row, _defaults())})


@bp.delete("/keys/<path:name>")
def revoke_key(name: str) -> Response:
    return jsonify({"data": keyops.view(keyops.revoke(g.actor, name), _defaults())})


@bp.post("/keys/<path:name>/topup")
def topup_key(name: str) -> Response:
    body = _json_body()
    if "amount" not in body:
        raise InvalidRequest("'amount' is required: the credits to add", param="amount")
    return jsonify({"data": keyops.view(keyops.topup(g.actor, name, body["amount"]), _defaults())})


# --------------------------------------------------------------------------------------------------
# usage, ledger, audit
# --------------------------------------------------------------------------------------------------

@bp.get("/usage")
def usage() -> Response:
    """What ``boundless usage --json`` prints, with the same filters."""
    by = request.args.get("by", "day")
    if by not in reports.GROUPS:
        raise InvalidRequest(f"'by' must be one of {', '.join(reports.GROUPS)}", param="by")
    key_name, model = _known_key(), _known_model()
    rows = reports.usage(by, key_name, model, _moment("since"), _moment("until", end=True))
    return jsonify({"data": [r.as_json(by) for r in rows], "by": by})


@bp.get("/ledger")
def ledger() -> Response:
    """Ledger rows, newest first; ``cursor`` from the previous page's ``next_cursor``; ``format=csv``."""
    as_csv = request.args.get("format", "json") == "csv"
    limit = _int_arg("limit", 1000 if as_csv else 100, 1, 100_000 if as_csv else 1000)
    rows, after = reports.ledger(_known_key(), request.args.get("model") or None,
                                 request.args.get("status") or None, _moment("since"), _moment("until", end=True),
                                 request.args.get("request_id") or None, limit,
                                 _int_arg("cursor", None, 1, 2**63 - 1))
    if as_csv:
        resp = Response(reports.ledger_csv(rows), mimetype="text/csv")
        resp.headers["Content-Disposition"] = "attachment; filename=ledger.csv"
        if after is not None:
            resp.headers["X-Next-Cursor"] = str(after)
        return resp
    return jsonify({"data": rows, "next_cursor": None if after is None else str(after)})


@bp.get("/audit")
def audit_log() -> Response:
    limit, offset = _int_arg("limit", 100, 1, 1000), _int_arg("offset", 0, 0, 10**9)
    entries = audit.recent(limit, offset, actor=request.args.get("actor") or None,
                           target=request.args.get("target") or None, action=request.args.get("action") or None)
    return jsonify({"data": [audit.as_dict(e) for e in entries], "limit": limit, "offset": offset})


# --------------------------------------------------------------------------------------------------
# input
# --------------------------------------------------------------------------------------------------

def _json_body() -> dict:
    raw = request.get_data(cache=False)
    if not raw.strip():
        return {}
    try:
        body = loads(raw)
    except ValueError:
        raise InvalidRequest("The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    return body


def _int_arg(name: str, default, lo: int, hi: int):
    text = request.args.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise InvalidRequest(f"'{name}' must be a whole number from {lo} to {hi}", param=name)
    return int(text)


def _moment(name: str, end: bool = False):
    try:
        return reports.parse_moment(request.args.get(name), end=end)
    except ValueError as err:
        raise InvalidRequest(f"'{name}': {err}", param=name) from None


def _known_key() -> str | None:
    name = request.args.get("key") or None
    if name and not ApiKey.select().where(ApiKey.name == name).exists():
        raise NotFound(f"no key named {name!r}", param="key", code="key_not_found")
    return name


def _known_model() -> str | None:
    model = request.args.get("model") or None
    if model and not reports.model_known(model, state().catalog.models):
        raise NotFound(f"no model named {model!r} in the catalogue or the ledger", param="model",
                       code="model_not_found")
    return model


def _defaults() -> keyops.Defaults:
    return keyops.Defaults.of(state().catalog)

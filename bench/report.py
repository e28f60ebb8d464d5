"""Turn the raw per-run numbers into medians, ratios to the floor, and the Markdown report.

Every point is measured once per repetition for every target, so each repetition gives a same-moment
comparison with ``direct``. Ratios (``x direct``) and added latencies (``+ms``) are computed *within* each
repetition and then the median across repetitions is reported; plain numbers are medians across repetitions.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable

FLOOR = "direct"
#: The issue's targets, checked for each boundless variant.
GATEWAYS = ("boundless-gthread", "boundless-gevent", "boundless-baseline")
MIB = 1024 * 1024


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def aggregate(points: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict]]:
    """``points[point][target] = [summary per repetition]`` -> medians, ratios and added latencies.

    Ratios and deltas pair the target's repetition *i* with direct's repetition *i*.
    """
    out: dict[str, dict[str, dict]] = {}
    for point, by_target in points.items():
        floor = by_target.get(FLOOR, [])
        out[point] = {}
        for target, runs in by_target.items():
            agg: dict[str, float | int | dict] = {"reps": len(runs)}
            for metric in ("rps", "p50_ms", "p99_ms", "ttfc_p50_ms", "ttfc_p99_ms", "cpu_ms_per_req",
                           "rss_peak_mib"):
                agg[metric] = _median([r.get(metric, math.nan) for r in runs])
            agg["client_cpu_pct"] = max((r["client_cpu_pct"] for r in runs), default=math.nan)   # the worst
            agg["errors"] = sum(r["errors"] for r in runs)
            agg["error_kinds"] = _merge([r["error_kinds"] for r in runs])
            pairs = list(zip(runs, floor))
            agg["x_direct"] = _median([r["rps"] / d["rps"] if d["rps"] else math.nan for r, d in pairs])
            for metric in ("p50_ms", "p99_ms", "ttfc_p50_ms"):
                agg[f"added_{metric}"] = _median([r.get(metric, math.nan) - d.get(metric, math.nan)
                                                  for r, d in pairs])
            out[point][target] = agg
    return out


def _merge(counters: list[dict]) -> dict:
    total: dict[str, int] = {}
    for c in counters:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def litellm_multiple(points: dict[str, dict[str, list[dict]]], point: str, target: str) -> float:
    """Median over repetitions of target rps / litellm rps at one point."""
    runs, ref = points.get(point, {}).get(target, []), points.get(point, {}).get("litellm", [])
    return _median([r["rps"] / d["rps"] if d["rps"] else math.nan for r, d in zip(runs, ref)])


# --------------------------------------------------------------------------- Markdown


def _f(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in
                                                            range(len(header))) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _errors(a: dict) -> str:
    """The errors cell; says so when nothing at all completed inside the measuring window."""
    return str(a["errors"]) + (" (none completed)" if not a["rps"] else "")


def _point_label(point: str) -> str:
    kind, upstream, conc = point.split("-")
    return f"{kind} {upstream} {conc.replace('c', 'c=')}"


def markdown(result: dict) -> str:
    """The whole report: setup, the JSON and stream tables, capacity, memory, and the issue's targets."""
    meta, agg = result["meta"], result["aggregate"]
    lines = [f"# Boundless benchmark — {meta['started']}", ""]
    lines += [f"- machine: {meta['machine']['cpu_model']}, {meta['machine']['nproc']} CPUs, "
              f"{meta['machine']['mem_total']} RAM; load average at start {meta['machine']['loadavg']}",
              f"- gateway code: {meta['code']}"
              + (f"; `boundless-baseline` is commit {meta['baseline']} (its shipped gunicorn.conf.py)"
                 if meta.get("baseline") else ""),
              "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
              f"- method: {meta['reps']} interleaved repetitions; per point a warm-up of at least {meta['warmup']} s "
              f"and until every client has had an answer (at most {meta['warmup_max']} s), then "
              f"{meta['duration']} s measured; {meta['pinning']}",
              f"- wall time: {meta['wall_s']:.0f} s", ""]
    failed = {t: v["error"] for t, v in result["targets"].items() if v["status"] != "ok"}
    for target, error in failed.items():
        lines += [f"**{target} failed**: " + error.replace("\n", " ⏎ ")[:800], ""]

    json_points = [p for p in agg if p.startswith("json")]
    stream_points = [p for p in agg if p.startswith("stream")]
    if json_points:
        lines += ["## JSON (non-stream) chat completions", "",
                  "req/s and latencies are medians of the repetitions; `x direct` and `+ms` compare with the "
                  "mock upstream measured in the same repetition. CPU = server process tree CPU per request.", ""]
        rows = []
        for p in json_points:
            for t, a in agg[p].items():
                rows.append([_point_label(p), t, _f(a["rps"], 0), _f(a["x_direct"], 2), _f(a["p50_ms"], 2),
                             _f(a["added_p50_ms"], 2, True), _f(a["p99_ms"], 2), _f(a["added_p99_ms"], 2, True),
                             _f(a["cpu_ms_per_req"], 2), _errors(a)])
        lines += _table(["point", "target", "req/s", "x direct", "p50 ms", "+p50", "p99 ms", "+p99",
                         "CPU ms/req", "errors"], rows) + [""]
    if stream_points:
        lines += ["## Streams (SSE, 20 chunks)", "",
                  "TTFC = time to the first chunk; latency = time to the end of the stream.", ""]
        rows = []
        for p in stream_points:
            for t, a in agg[p].items():
                rows.append([_point_label(p), t, _f(a["rps"], 0), _f(a["x_direct"], 2), _f(a["ttfc_p50_ms"], 2),
                             _f(a["added_ttfc_p50_ms"], 2, True), _f(a["ttfc_p99_ms"], 2), _f(a["p50_ms"], 1),
                             _f(a["p99_ms"], 1), _f(a["cpu_ms_per_req"], 2), _errors(a)])
        lines += _table(["point", "target", "streams/s", "x direct", "TTFC p50", "+TTFC p50", "TTFC p99",
                         "p50 ms", "p99 ms", "CPU ms/stream", "errors"], rows) + [""]

    lines += ["## Memory", "", "Peak RSS of each server's process tree (sum of VmRSS), over all points "
              "(capacity test separately below).", ""]
    lines += _table(["target", "peak RSS MiB"], [[t, _f(v.get("peak_rss_mib"), 0)]
                                                 for t, v in result["targets"].items() if v["status"] == "ok"])
    lines.append("")

    if result["capacity"]:
        cap = meta["capacity"]
        lines += ["## Capacity: open streams", "",
                  f"{cap['streams']} streams opened over {cap['ramp']} s, each {cap['chunks']} chunks "
                  f"{cap['gap']} s apart; `GET {{prefix}}/models` probed every {cap['probe_interval'] * 1000:.0f} ms "
                  f"meanwhile (a probe without an answer in {cap['probe_timeout']:.0f} s is an error and counts as "
                  f"{cap['probe_timeout']:.0f} s in the percentiles). Streams still open {cap['grace']:.0f} s after "
                  f"their due end are cut and count as failed.", ""]
        rows = []
        for t, c in result["capacity"].items():
            if "error" in c:
                rows.append([t, "–", "–", "–", "–", "–", "–", "–", c["error"][:200]])
                continue
            kinds = ", ".join([f"{k}: {v}" for k, v in c["error_kinds"].items()]
                              + [f"probe {k}: {v}" for k, v in c["probe_error_kinds"].items()])
            rows.append([t, f"{c['ok']}/{c['streams']}", str(c["peak_open"]), _f(c["ttfc_p99_ms"], 1),
                         _f(c["duration_max_s"], 1), f"{_f(c['probe_p50_ms'], 1)} / {_f(c['probe_p99_ms'], 1)}",
                         f"{c['probe_errors']}/{c['probe_count']}", _f(c["rss_peak_mib"], 0), kinds or "–"])
        lines += _table(["target", "streams ok", "peak open", "TTFC p99 ms", "longest s", "/models p50 / p99 ms",
                         "probe errors", "peak RSS MiB", "errors"], rows) + [""]

    checks = issue_checks(result)
    if checks:
        lines += ["## Against the issue's targets", ""]
        names = [g for g in GATEWAYS if g in result["targets"]]
        rows = [[label, goal] + [c.get(g, "–") for g in names] for label, goal, c in checks]
        lines += _table(["metric", "target", *names], rows) + [""]
    hot = [f"{_point_label(p)} {t}: {a['client_cpu_pct']:.0f}%" for p in agg for t, a in agg[p].items()
           if a["client_cpu_pct"] > 85]
    if hot:
        lines += ["The load driver used more than 85% of a core in a repetition of (so these may be client-bound): "
                  + "; ".join(hot) + ".", ""]
    return "\n".join(lines)


def issue_checks(result: dict) -> list[tuple[str, str, dict[str, str]]]:
    """(metric, goal, {gateway: "value ✅/❌"}) for each target of the issue."""
    agg, points, capacity = result["aggregate"], result["points"], result["capacity"]
    gateways = [g for g in GATEWAYS if g in result["targets"] and result["targets"][g]["status"] == "ok"]
    if not gateways:
        return []

    def metric(point: str, key: str) -> Callable[[str], float]:
        return lambda g: agg.get(point, {}).get(g, {}).get(key, math.nan)

    def vs_litellm(point: str) -> Callable[[str], float]:
        return lambda g: litellm_multiple(points, point, g)

    def cap(key: str, scale: float = 1.0) -> Callable[[str], float]:
        return lambda g: capacity.get(g, {}).get(key, math.nan) * scale

    specs: list[tuple[str, str, Callable[[str], float], Callable[[float], bool], int, str]] = [
        ("JSON c=1 added p50", "≤ 1.5 ms", metric("json-fast-c1", "added_p50_ms"), lambda v: v <= 1.5, 2, " ms"),
        ("JSON c=1 added p99", "≤ 4 ms", metric("json-fast-c1", "added_p99_ms"), lambda v: v <= 4, 2, " ms"),
        ("JSON c=64 throughput", "≥ 800 req/s", metric("json-fast-c64", "rps"), lambda v: v >= 800, 0, " req/s"),
        ("JSON c=64 vs LiteLLM", "≥ 4x", vs_litellm("json-fast-c64"), lambda v: v >= 4, 2, "x"),
        ("stream c=1 added TTFC p50", "≤ 2.5 ms", metric("stream-fast-c1", "added_ttfc_p50_ms"),
         lambda v: v <= 2.5, 2, " ms"),
        ("stream c=64 throughput", "≥ 250 streams/s", metric("stream-fast-c64", "rps"), lambda v: v >= 250, 0,
         " /s"),
        ("stream c=64 TTFC p50", "≤ 150 ms", metric("stream-fast-c64", "ttfc_p50_ms"), lambda v: v <= 150, 1, " ms"),
        ("stream c=64 vs LiteLLM", "≥ 4x", vs_litellm("stream-fast-c64"), lambda v: v >= 4, 2, "x"),
        ("slow JSON c=256 vs direct", "≥ 0.9x", metric("json-slow-c256", "x_direct"), lambda v: v >= 0.9, 2, "x"),
        ("slow stream c=256 vs direct", "≥ 0.9x", metric("stream-slow-c256", "x_direct"), lambda v: v >= 0.9, 2,
         "x"),
        ("capacity: streams ok", f"{result['meta']['capacity']['streams']}, none failed", cap("ok"),
         lambda v: v >= result["meta"]["capacity"]["streams"], 0, ""),
        ("capacity: /models p99", "≤ 100 ms", cap("probe_p99_ms"), lambda v: v <= 100, 1, " ms"),
        ("capacity: peak RSS", "≤ 1 GiB", cap("rss_peak_mib"), lambda v: v <= 1024, 0, " MiB"),
        ("CPU per JSON request (c=64)", "≤ 1.2 ms", metric("json-fast-c64", "cpu_ms_per_req"),
         lambda v: v <= 1.2, 2, " ms"),
        ("CPU per 20-chunk stream (c=64)", "≤ 3 ms", metric("stream-fast-c64", "cpu_ms_per_req"),
         lambda v: v <= 3, 2, " ms"),
    ]
    rows = []
    for label, goal, get, ok, digits, unit in specs:
        cells = {}
        for g in gateways:
            v = get(g)
            cells[g] = "–" if math.isnan(v) else f"{v:.{digits}f}{unit} {'✅' if ok(v) else '❌'}"
        if any(c != "–" for c in cells.values()):
            rows.append((label, goal, cells))
    if any(capacity.get(g, {}).get("probe_errors") for g in gateways):
        rows.append(("capacity: /models probe failures", "0",
                     {g: str(capacity.get(g, {}).get("probe_errors", "–")) for g in gateways}))
    return rows

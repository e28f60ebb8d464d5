"""
app.console.charts
~~~~~~~~~~~~~~~~~~

Bar charts as SVG, drawn on the server: no JavaScript library, nothing from a CDN, and nothing the
Content-Security-Policy has to allow (colours come from console.css through class names; the SVG has no
``style`` attribute and no script). Every label is escaped.
"""
from __future__ import annotations

from markupsafe import Markup
from markupsafe import escape

WIDTH, HEIGHT = 640, 200
LEFT, BOTTOM, TOP = 56, 24, 12


def _number(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    return f"{value:g}" if value >= 1 or value == 0 else f"{value:.6f}".rstrip("0")


def bars(points: list[tuple[str, float]], title: str, unit: str = "") -> Markup:
    """A bar chart of (label, value) pairs, in order; an empty series draws an empty frame."""
    top = max((v for _, v in points), default=0) or 1
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP
    step = plot_w / max(len(points), 1)
    out = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
           f'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMidYMid meet">',
           f'<title>{escape(title)}</title>',
           f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - 8}" y2="{TOP + plot_h}"/>',
           f'<text class="tick" x="{LEFT - 6}" y="{TOP + 10}" text-anchor="end">{escape(_number(top))}</text>',
           f'<text class="tick" x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end">0</text>']
    every = max(1, len(points) // 8)
    for i, (label, value) in enumerate(points):
        h = plot_h * (value / top)
        x = LEFT + i * step + step * 0.1
        out.append(f'<rect class="bar" x="{x:.1f}" y="{TOP + plot_h - h:.1f}" width="{step * 0.8:.1f}" '
                   f'height="{h:.1f}"><title>{escape(label)}: {escape(_number(value))}{escape(unit)}</title></rect>')
        if i % every == 0:
            out.append(f'<text class="tick" x="{x + step * 0.4:.1f}" y="{HEIGHT - 6}" text-anchor="middle">'
                       f'{escape(label)}</text>')
    out.append("</svg>")
    return Markup("".join(out))

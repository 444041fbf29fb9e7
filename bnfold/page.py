"""`--report FILE.html`: the JSON report as one self-contained page (no script, no server, nothing
fetched), for the people who would rather look than read. It shows, top to bottom: the verdict;
each fold site's error against what its rule allowed, along the network's depth; the rules that
decided; the outputs; what was folded where and what was skipped and why; the notes."""

from __future__ import annotations

import math
from html import escape

from bnfold.verification.tolerance import NOISE_FACTOR
from bnfold.verification.verdict import RULES

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 75em; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: .2em; } h2 { font-size: 1.1em; margin-top: 2em; }
.verdict { font-size: 1.15em; padding: .5em .8em; border-radius: 4px; }
.ok { background: #e3f4e6; } .fail { background: #fbe2e2; } .plain { background: #eee; }
table { border-collapse: collapse; width: 100%; } td, th { text-align: left; padding: .25em .6em; vertical-align: top; }
tr:nth-child(even) td { background: #f6f6f6; } th { border-bottom: 1px solid #999; }
td.bad, ul.bad { color: #b00; } code { font-size: .95em; } .muted { color: #777; }
svg text { font: 12px system-ui, sans-serif; }
"""
PASS, FAIL, LIMIT, NOISE = "#2a8a3e", "#c0262d", "#888", "#e08a00"


def render(data: dict) -> str:
    """The page for one command's JSON report (optimize's, or verify's)."""
    check = data.get("verification") if "verification" in data else data if "sites" in data else None
    model = data.get("input") or data.get("reference") or "model"
    parts = [
        f"<h1>bnfold {escape(data.get('command') or '')}: {escape(str(model))}</h1>",
        _verdict(data, check),
        _sites(check, data),
        _rules(check),
        _outputs(check),
        _folds(data),
        _notes(data, check),
        f"<p class=muted>bnfold {escape(str(data.get('bnfold_version', '')))} · report schema "
        f"{escape(str(data.get('schema_version', '')))}</p>",
    ]
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>bnfold: {escape(str(model))}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(p for p in parts if p)
        + "\n</body></html>\n"
    )


def _verdict(data: dict, check: dict | None) -> str:
    lines = []
    summary = data.get("summary")
    if isinstance(summary, dict) and "folded" in summary:
        lines.append(
            f"folded {summary['folded']} of {summary['batch_normalization_nodes']} BatchNormalization nodes"
            + (
                f" and {summary['channel_affines_folded']} Mul/Add/Sub/Div"
                if summary.get("channel_affines_folded")
                else ""
            )
            + (f"; merged {summary['branch_merges']} sums of branches" if summary.get("branch_merges") else "")
        )
    if check is None:
        lines.append("not verified")
    else:
        judged = [*check.get("outputs", []), *check.get("sites", [])]
        failed = [o for o in judged if not o.get("passed")]
        differ = f"NOT equivalent: {len(failed)} of {len(judged)} tensors compared differ"
        lines.append("equivalent" if check.get("equivalent") else differ)
        lines.append(f"{check.get('trials', 0)} trials, seed {check.get('seed', 0)}")
    if data.get("error"):
        lines.append(f"error: {data['error']}")
    good = check is not None and check.get("equivalent") and not data.get("error")
    kind = "ok" if good else "fail" if check is not None or data.get("error") else "plain"
    verdict = f"<p class='verdict {kind}'>{escape(' · '.join(lines))}</p>"
    failures = (
        "".join(
            f"<li><code>{escape(o['name'])}</code>: {escape(_judged(o))}</li>" for o in judged if not o.get("passed")
        )
        if check is not None
        else ""
    )
    return verdict + (f"<ul class=bad>{failures}</ul>" if failures else "")


def _sites(check: dict | None, data: dict) -> str:
    """An SVG chart: one column per fold site in graph order, its error (in units of the tensor's
    scale S, log axis) as a dot, green or red, beside the policy's allowance (grey) and, where
    the noise yardstick ran, NOISE_FACTOR × the reference's own noise (orange)."""
    if check is None:
        return ""
    sites = check.get("sites", [])
    head = "<h2>Each fold site: its error against what was allowed, along the network's depth</h2>"
    if not sites:
        return head + "<p class=muted>no rewritten tensor was compared where it is made</p>"
    into = {
        b.get("output"): b.get("node") for key in ("batch_normalizations", "channel_affines") for b in data.get(key, [])
    }
    values = [v for s in sites for v in (s.get("needed_atol"), s.get("atol"), _noise_limit(s)) if v and v > 0]
    low, high = math.floor(math.log10(min(values, default=1e-9))), math.ceil(math.log10(max(values, default=1.0)))
    high = max(high, low + 1)
    width, height, left, top, bottom = max(480, 14 * len(sites) + 90), 300, 70, 20, 40
    step = (width - left - 20) / len(sites)

    def y(value: float) -> float:
        return top + (high - math.log10(value)) / (high - low) * (height - top - bottom)

    svg = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role=img>"]
    for exponent in range(low, high + 1):
        at = y(10.0**exponent)
        svg.append(
            f"<line x1='{left}' x2='{width - 20}' y1='{at:.1f}' y2='{at:.1f}' stroke='#ddd'/>"
            f"<text x='{left - 6}' y='{at + 4:.1f}' text-anchor=end>1e{exponent}</text>"
        )
    for i, site in enumerate(sites):
        x = left + step * (i + 0.5)
        name = escape(f"{into.get(site.get('name'), site.get('name'))}: {_judged(site)}")
        for value, colour in ((site.get("atol"), LIMIT), (_noise_limit(site), NOISE)):
            if value and value > 0:
                at, half = y(value), step * 0.4
                svg.append(
                    f"<line x1='{x - half:.1f}' x2='{x + half:.1f}' y1='{at:.1f}' y2='{at:.1f}' "
                    f"stroke='{colour}' stroke-width=2><title>{name}</title></line>"
                )
        error = site.get("needed_atol")
        colour = PASS if site.get("passed") else FAIL
        if error is None or error <= 0:
            mark = y(10.0**low) if error is not None else top
            svg.append(f"<circle cx='{x:.1f}' cy='{mark:.1f}' r=4 fill='{colour}'><title>{name}</title></circle>")
        else:
            svg.append(f"<circle cx='{x:.1f}' cy='{y(error):.1f}' r=4 fill='{colour}'><title>{name}</title></circle>")
    svg.append(f"<text x='{left}' y='{height - 12}'>fold sites in graph order: input → output</text></svg>")
    legend = (
        f"<p><span style='color:{PASS}'>●</span> error of a site that passed, <span style='color:{FAIL}'>●</span> "
        f"of one that failed (its largest difference in units of the tensor's scale S) · <span style='color:{LIMIT}'>"
        f"—</span> the policy's atol · <span style='color:{NOISE}'>—</span> {NOISE_FACTOR:.0f}× the reference's own "
        "noise, where it was measured. Hover over a mark for the site and its rule.</p>"
    )
    return head + "\n".join(svg) + legend


def _noise_limit(site: dict) -> float | None:
    return NOISE_FACTOR * site["noise"] if site.get("noise") else None


def _rules(check: dict | None) -> str:
    if check is None:
        return ""
    judged = [*check.get("sites", []), *check.get("outputs", [])]
    rows = []
    for rule in RULES:
        decided = [t for t in judged if t.get("rule") == rule.name]
        failed = sum(not t.get("passed") for t in decided)
        rows.append(
            f"<tr><td><code>{rule.name}</code></td><td>{escape(rule.says)}</td><td>{len(decided)}</td>"
            f"<td class='{'bad' if failed else ''}'>{failed}</td></tr>"
        )
    return (
        "<h2>The rules that decided</h2><table><tr><th>rule</th><th>says</th><th>tensors it decided</th>"
        "<th>failed</th></tr>" + "".join(rows) + "</table>"
    )


def _outputs(check: dict | None) -> str:
    if check is None or not check.get("outputs"):
        return ""
    rows = "".join(
        f"<tr><td>{escape(o['name'])}</td><td>{escape(o.get('dtype') or '')}</td>"
        f"<td>{'x'.join(map(str, o.get('shape') or [])) or 'scalar'}</td><td>{_figure(o.get('max_abs_error'))}</td>"
        f"<td>{_figure(o.get('needed_atol'))}</td>"
        f"<td class='{'' if o.get('passed') else 'bad'}'>{escape(_judged(o))}</td></tr>"
        for o in sorted(check["outputs"], key=lambda o: bool(o.get("passed")))
    )
    return (
        "<h2>Outputs</h2><table><tr><th>output</th><th>dtype</th><th>shape</th><th>max abs</th>"
        f"<th>needed atol</th><th>result</th></tr>{rows}</table>"
    )


def _folds(data: dict) -> str:
    outcomes = [o for key in ("batch_normalizations", "channel_affines", "branch_merges") for o in data.get(key, [])]
    if not outcomes:
        return ""
    rows = []
    for o in sorted(outcomes, key=lambda o: o.get("status") == "folded"):
        folded = o.get("status") == "folded"
        where = f"{o.get('folded_into_op')} {o.get('folded_into')}" + (f" ({o['via']})" if o.get("via") else "")
        rows.append(
            f"<tr><td>{escape(o.get('node') or '')}</td><td>{escape(o.get('op') or '')}</td>"
            f"<td class='{'' if folded else 'bad'}'>{'folded' if folded else 'skipped'}</td>"
            f"<td>{escape(where if folded else o.get('reason') or '')}</td></tr>"
        )
    return (
        "<h2>What was folded where</h2><table><tr><th>node</th><th>op</th><th>result</th><th>into, or why not</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _notes(data: dict, check: dict | None) -> str:
    notes = list(data.get("notes", []))
    if check is not None and check is not data:
        notes += check.get("notes", [])
    if not notes:
        return ""
    return "<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n.removeprefix('note: '))}</li>" for n in notes) + "</ul>"


def _judged(t: dict) -> str:
    text = t.get("explained") or t.get("reason") or ("ok" if t.get("passed") else "FAIL")
    return f"{text} (rule: {t.get('rule')})" if t.get("rule") else text


def _figure(value) -> str:
    return "-" if value is None else f"{value:.2e}"

"""The comparison report: rows aggregated over calibration seeds (mean ± sd), which
differences are within seed noise, as markdown and JSON."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

# Numbers aggregated per (recipe, bits) over seeds; task metrics are added per task.
MEASURES = ("ppl", "kl", "bits_per_weight", "quantize_seconds", "peak_rss_mb")


def mean_sd(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (None with fewer than 2 values) of the given values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None,
            "n": len(xs)}  # fmt: skip


def task_metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``task/metric`` for every task metric any row has (stderr left out), in first-seen order."""
    names: dict[str, None] = {}
    for row in rows:
        for task, metrics in (row.get("tasks") or {}).items():
            for metric in metrics:
                if "stderr" not in metric:
                    names[f"{task}/{metric}"] = None
    return list(names)


def _value(row: dict[str, Any], measure: str) -> float | None:
    if "/" in measure:
        task, metric = measure.split("/", 1)
        return (row.get("tasks") or {}).get(task, {}).get(metric)
    return row.get(measure)


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (recipe, bits, source) with every measure's mean/sd/n over its seeds."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row.get("recipe"), row.get("bits"), row.get("source", "compensator"))
        groups.setdefault(key, []).append(row)
    measures = [*MEASURES, *task_metrics(rows)]
    out = []
    for (recipe, bits, source), members in groups.items():
        out.append(
            {
                "recipe": recipe,
                "bits": bits,
                "source": source,
                "scheme": members[0].get("scheme"),
                "seeds": [m.get("seed") for m in members],
                "fixed": all(m.get("fixed", False) for m in members),
                **{m: mean_sd([_value(r, m) for r in members]) for m in measures},
            }
        )
    return out


def noise(summary: Sequence[dict[str, Any]], measure: str = "ppl") -> list[dict[str, Any]]:
    """Per bits, every row against the best (lowest mean) and against the row just above it:
    ``within`` noise when the gap is at most twice its standard error
    (sqrt(sd_a^2/n_a + sd_b^2/n_b)); a ``fixed`` row (no random draw: RTN) adds nothing to it;
    ``None`` when a side that varies with the seed has a single run (nothing to tell noise by)."""
    out = []
    for bits in sorted({s["bits"] for s in summary if s["recipe"]}, key=lambda b: -(b or 0)):
        entries = [s for s in summary if s["bits"] == bits and s[measure]["mean"] is not None]
        entries.sort(key=lambda s: s[measure]["mean"])
        for i, s in enumerate(entries[1:], start=1):
            pairs = [("best", entries[0])] + ([("next", entries[i - 1])] if i > 1 else [])
            for against, ref in pairs:
                gap = s[measure]["mean"] - ref[measure]["mean"]
                terms = [_variance(e, measure) for e in (ref, s)]
                se = None if None in terms else math.sqrt(sum(t for t in terms if t is not None))
                out.append({"bits": bits, "against": against, "reference": _label(ref),
                            "other": _label(s), "gap": gap,
                            "two_se": None if se is None else 2 * se,
                            "within_noise": None if se is None else gap <= 2 * se})  # fmt: skip
    return out


def _variance(entry: dict[str, Any], measure: str) -> float | None:
    """The squared standard error of an entry's mean: 0 for a fixed row, None for one run."""
    stat = entry[measure]
    if entry.get("fixed"):
        return 0.0
    return None if stat["n"] < 2 else stat["sd"] ** 2 / stat["n"]


def is_peer(entry: dict[str, Any]) -> bool:
    return entry.get("source", "compensator") != "compensator"


def row_name(entry: dict[str, Any]) -> str:
    """The recipe, with the peer toolkit that ran it in brackets."""
    return f"{entry['recipe']} ({entry['source']})" if is_peer(entry) else entry["recipe"]


def _label(entry: dict[str, Any]) -> str:
    return f"{row_name(entry)} {entry.get('scheme') or ''}".strip()


def _fmt(stat: dict[str, Any], digits: int) -> str:
    if stat["mean"] is None:
        return "-"
    text = f"{stat['mean']:,.{digits}f}"
    return text if stat["sd"] is None else f"{text} ± {stat['sd']:,.{digits}f}"


_DIGITS = {"ppl": 2, "kl": 4, "bits_per_weight": 2, "quantize_seconds": 1, "peak_rss_mb": 0}
_HEAD = {"ppl": "ppl", "kl": "KL vs FP", "bits_per_weight": "bits/weight",
         "quantize_seconds": "quantize s", "peak_rss_mb": "peak RSS MB"}  # fmt: skip


def markdown(
    summary: Sequence[dict[str, Any]], fp: dict[str, Any], notes: Sequence[dict[str, Any]],
    protocol: str, command: str,
) -> str:  # fmt: skip
    """The report page: protocol, the table (FP first), the noise verdicts, the command."""
    tasks = [m for m in summary[0] if "/" in m] if summary else []
    cols = ["ppl", "kl", *tasks, "bits_per_weight", "quantize_seconds", "peak_rss_mb"]
    lines = [
        "# Comparison",
        "",
        protocol,
        "",
        "| recipe | scheme | runs | " + " | ".join(_HEAD.get(c, c) for c in cols) + " |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in cols) + " |",
    ]
    fp_cells = {"ppl": f"{fp['ppl']:.2f}", "kl": "0"} | {
        t: "-" if _value(fp, t) is None else f"{_value(fp, t):.4f}" for t in tasks
    }
    lines.append("| FP | - | 1 | " + " | ".join(fp_cells.get(c, "-") for c in cols) + " |")
    order = sorted(summary, key=lambda s: (-(s["bits"] or 0), s["ppl"]["mean"] or math.inf))
    for s in order:
        values = [_fmt(s[c], _DIGITS.get(c, 4)) for c in cols]
        lines.append(
            f"| {row_name(s)} | {s['scheme'] or '-'} | {s['ppl']['n']} | {' | '.join(values)} |"
        )
    lines += [
        "",
        "Mean ± sample standard deviation over the calibration seeds of each row; a row with "
        "no random draw (no calibration data, no seeded step: RTN) runs once, its value holds "
        "for every seed.",
    ]
    if notes:
        lines += ["", "Is a gap at the same bits more than seed noise (ppl; each row against the "
                  "best and against the row just above it)?", ""]  # fmt: skip
        for n in notes:
            if n["within_noise"] is None:
                verdict = "one run on a side: cannot tell noise from a difference"
            else:
                word = "within noise" if n["within_noise"] else "beyond noise"
                verdict = f"{word} (2 standard errors: {n['two_se']:,.2f})"
            where = f"W{n['bits']}" if n["bits"] else "default bits"
            lines.append(
                f"- {where}: {n['other']} is {n['gap']:+,.2f} from {n['reference']}: {verdict}"
            )
    lines += ["", "Command:", "", "```bash", command, "```", ""]
    return "\n".join(lines)

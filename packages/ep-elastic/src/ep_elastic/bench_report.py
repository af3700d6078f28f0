"""Output of ``ep-bench``: the text table and the JSON document (the plot: ``bench_plot``).

Runs in the CLI process on the records rank 0 wrote. The default table fits
:data:`TABLE_WIDTH` characters and leaves out the columns that say nothing for the cases run (SM
counts of the reference backend, kernel and in-graph times where none were measured); ``--wide``
prints every column.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BYTE_COUNTING",
    "IN_GRAPH_CALLS",
    "TABLE_WIDTH",
    "build_document",
    "format_table",
    "git_commit",
    "table_columns",
    "write_json",
]

IN_GRAPH_CALLS = 8
"""Calls per graph for the low-latency per-call time inside a graph (``in_graph_us``)."""

BYTE_COUNTING = {
    "logical": (
        "rows received per rank INCLUDING the rank's own rows x (data + FP8 scale bytes); "
        "combine: the same rows x 2H (bf16). The number our targets use."
    ),
    "deepep": (
        "as DeepEP's tests: logical + 12k bytes per dispatched row (int64 top-k ids + float32 "
        "weights), + 4k per combined row (weights); low-latency FP8 dispatch + 16 bytes per row."
    ),
    "remote": "logical bytes of the rows that cross to another rank only (NVLink traffic).",
    "time": (
        "median over the repeats of each repeat's max over ranks of each rank's median (p10/p90 "
        "likewise) of whole calls (CUDA events, host clock on CPU; before each: L2 flush, "
        "barrier and, on GPUs, a sleep kernel + one-element all-reduce as a shared start line; "
        "EP_CHECK_INPUTS off); bytes are the mean per rank."
    ),
    "kernel": (
        "kern_us = device time of the call's own kernels (routing layout + dispatch, or combine; "
        "torch profiler, same start line, median of 10 calls per kernel, max over ranks): "
        "what DeepEP's tests report as their kernel time; no host work or host sync in it. "
        "kGB/s = logical bytes / kern_us. '-' = not measured (reference backend, CPU)."
    ),
    "in_graph": (
        f"g{IN_GRAPH_CALLS}_us (ll, CUDA graphs only) = per call inside one graph of "
        f"{IN_GRAPH_CALLS} dispatches (or {IN_GRAPH_CALLS} combines of the last dispatch's "
        f"handle): replay time / {IN_GRAPH_CALLS}, same start line; one graph launch shared by "
        "the calls, as in a serving step's graph. med_us replays a graph of one call."
    ),
    "low_latency_rows": "one row per (token, expert) selection, as the LL layout stores it.",
}


def git_commit(path: Path) -> str | None:
    """``git rev-parse HEAD`` of the checkout holding ``path``, or ``None`` when unavailable."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit or None


def build_document(
    meta: dict[str, Any], config: dict[str, Any], cases: list[dict[str, Any]], argv: Sequence[str]
) -> dict[str, Any]:
    """The JSON document: run metadata, config, byte-counting rules, overall status and cases."""
    failed = any(c["status"] != "PASS" or c["baseline"]["status"] == "FAIL" for c in cases)
    full_meta = {
        **meta,
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv),
        "python": platform.python_version(),
        "host": platform.node(),
    }
    return {
        "meta": full_meta,
        "config": config,
        "byte_counting": BYTE_COUNTING,
        "status": "FAIL" if failed else "PASS",
        "cases": cases,
    }


TABLE_WIDTH = 100
"""Characters the default table (and its notes) fits in; ``--wide`` prints every column."""


def _sms(case: dict[str, Any]) -> str:
    if case["mode"] != "ht":
        return "-"
    if case["num_sms"] == 0:
        return f"auto:{case['num_sms_used']}" if case["num_sms_used"] else "auto"
    return str(case["num_sms"])


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else f"{value:{fmt}}"


def _speedup(case: dict[str, Any]) -> dict[str, Any]:
    """The case's speedup record; documents written before repeats have only the two times."""
    if "speedup" in case:
        return dict(case["speedup"])
    lat = case["latency_us"]["median"]
    ratio = case["baseline"]["latency_us"]["median"] / lat if lat > 0 else 0.0
    return {"value": ratio, "min": None, "max": None, "per_repeat": [ratio]}


def _range(case: dict[str, Any]) -> str:
    sp = _speedup(case)
    if sp["min"] is None or len(sp["per_repeat"]) < 2:
        return "-"
    return f"{sp['min']:.2f}-{sp['max']:.2f}"


Column = tuple[str, str, Callable[[dict[str, Any]], str]]
"""``(header, alignment, cell of a case)``."""

_COLUMNS: dict[str, Column] = {
    "mode": ("mode", "<", lambda c: c["mode"]),
    "op": ("op", "<", lambda c: c["op"] + ("*" if c["graph"] else "")),
    "dtype": ("dtype", "<", lambda c: c["dtype"]),
    "sms": ("sms", ">", _sms),
    "tokens": ("tokens", ">", lambda c: str(c["num_tokens"])),
    "check": ("check", "<", lambda c: c["status"]),
    "med_us": ("med_us", ">", lambda c: f"{c['latency_us']['median']:.1f}"),
    "p10_us": ("p10_us", ">", lambda c: f"{c['latency_us']['p10']:.1f}"),
    "p90_us": ("p90_us", ">", lambda c: f"{c['latency_us']['p90']:.1f}"),
    "gbps": ("GB/s", ">", lambda c: f"{c['gbps']['logical']:.2f}"),
    "dpep": ("dpep", ">", lambda c: f"{c['gbps']['deepep']:.2f}"),
    "kern_us": ("kern_us", ">", lambda c: _num(c.get("kernel_us"))),
    "kgbps": (
        "kGB/s",
        ">",
        lambda c: _num((c.get("kernel_gbps") or {}).get("logical"), ".2f"),
    ),
    "g_us": (f"g{IN_GRAPH_CALLS}_us", ">", lambda c: _num(c.get("in_graph_us"))),
    "rem_mb": ("rem_MB", ">", lambda c: f"{c['bytes']['remote'] / 1e6:.3f}"),
    "rem_gbps": ("rem_GB/s", ">", lambda c: f"{c['gbps']['remote']:.2f}"),
    "sep": ("|", "<", lambda c: "|"),
    "base_us": ("base_us", ">", lambda c: f"{c['baseline']['latency_us']['median']:.1f}"),
    "base_gbps": ("base_GB/s", ">", lambda c: f"{c['baseline']['gbps']['logical']:.2f}"),
    "base_rem": ("base_rem", ">", lambda c: f"{c['baseline']['gbps']['remote']:.2f}"),
    "base": (
        "base",
        "<",
        lambda c: {"PASS": "PASS", "FAIL": "FAIL"}.get(c["baseline"]["status"], "-"),
    ),
    "speedup": ("speedup", ">", lambda c: f"{_speedup(c)['value']:.2f}x"),
    "range": ("range", ">", _range),
}

_WIDE_ONLY = ("dpep", "rem_mb", "rem_gbps", "base_gbps", "base_rem")
"""Left out of the default table (in ``--wide`` and the JSON)."""

_DROP_ORDER = ("kgbps", "p10_us", "p90_us", "sep")
"""Optional columns of the default table, the first left out first when it is too wide."""


def _applies(key: str, cases: list[dict[str, Any]], backend: str) -> bool:
    """Whether a column says anything for these cases (the default table shows only those)."""
    ht = [c for c in cases if c["mode"] == "ht"]
    if key == "sms":
        # The reference backend runs no kernels; its SM count means something only when the
        # user sweeps it (the rows then differ by it).
        return bool(ht) and (backend != "torch" or any(c["num_sms"] != 0 for c in ht))
    if key in ("kern_us", "kgbps"):
        return any(c.get("kernel_us") is not None for c in cases)
    if key == "g_us":
        return any(c.get("in_graph_us") is not None for c in cases)
    if key == "base":
        return any(c["baseline"]["status"] == "FAIL" for c in cases)
    if key == "range":
        return any(_range(c) != "-" for c in cases)
    return True


def _layout(keys: list[str], cases: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """Each column with the width of its widest cell or header."""
    widths = []
    for key in keys:
        header, _, cell = _COLUMNS[key]
        widths.append((key, max([len(header)] + [len(cell(c)) for c in cases])))
    return widths


def _width(layout: list[tuple[str, int]]) -> int:
    return sum(w for _, w in layout) + len(layout) - 1


def table_columns(doc: dict[str, Any], wide: bool = False) -> list[tuple[str, int]]:
    """``(column key, width)`` of the table: every column, or those that apply and fit.

    Args:
        doc: The JSON document.
        wide: Every column (as ``--wide``), else the default table: columns that say nothing for
            these cases left out, then optional ones until it fits :data:`TABLE_WIDTH`.
    """
    cases = doc["cases"]
    if wide:
        return _layout(list(_COLUMNS), cases)
    backend = doc["meta"].get("backend_name", "")
    keys = [k for k in _COLUMNS if k not in _WIDE_ONLY and _applies(k, cases, backend)]
    layout = _layout(keys, cases)
    for key in _DROP_ORDER:
        if _width(layout) <= TABLE_WIDTH:
            break
        layout = [(k, w) for k, w in layout if k != key]
    return layout


def _row(layout: list[tuple[str, int]], values: Sequence[str]) -> str:
    return " ".join(
        f"{v:{_COLUMNS[k][1]}{w}}" for v, (k, w) in zip(values, layout, strict=True)
    ).rstrip()


def _wrap(text: str, wide: bool) -> list[str]:
    if wide:
        return [text]
    return textwrap.wrap(text, TABLE_WIDTH, subsequent_indent="    ", break_on_hyphens=False)


def _shape_line(doc: dict[str, Any]) -> str | None:
    cfg = doc.get("config") or {}
    if "hidden" not in cfg:
        return None
    repeats = cfg.get("repeats", 1)
    calls = f"{repeats} repeats x {cfg['iters']}" if repeats > 1 else f"{cfg['iters']}"
    return (
        f"H={cfg['hidden']}, top-{cfg['num_topk']} of {cfg['num_experts']} experts, "
        f"{cfg['routing']} routing; {calls} timed calls after {cfg['warmup']} warm-up"
    )


def format_table(doc: dict[str, Any], wide: bool = False) -> str:
    """The human-readable table of a JSON document, with its notes.

    Args:
        doc: The JSON document (:func:`build_document`).
        wide: Every column and unwrapped notes, as ``ep-bench --wide``; else the columns that
            apply to these cases, fitted to :data:`TABLE_WIDTH` characters.
    """
    meta, cases = doc["meta"], doc["cases"]
    layout = table_columns(doc, wide)
    shown = {k for k, _ in layout}
    lines = _wrap(
        f"ep-bench: {meta['num_ranks']} ranks on {meta['device']}, backend "
        f"{meta['backend_name']!r} (reference 'torch'), torch {meta['torch']}",
        wide,
    )
    shape = _shape_line(doc)
    if shape:
        lines += _wrap(shape, wide)
    lines.append(_row(layout, [_COLUMNS[k][0] for k, _ in layout]))
    lines += [_row(layout, [_COLUMNS[k][2](c) for k, _ in layout]) for c in cases]
    notes = ["GB/s = logical: " + BYTE_COUNTING["logical"]]
    if "dpep" in shown:
        notes.append("dpep = " + BYTE_COUNTING["deepep"])
    if "rem_mb" in shown:
        notes.append("rem = " + BYTE_COUNTING["remote"])
    notes.append("times: " + BYTE_COUNTING["time"])
    if "kern_us" in shown:
        notes.append(BYTE_COUNTING["kernel"])
    if "g_us" in shown:
        notes.append(BYTE_COUNTING["in_graph"])
    notes.append(
        "base = plain all_to_all_single pipeline in the same run (its own rows for ll); "
        "speedup = base_us / med_us; range = its lowest and highest value over the repeats "
        "(both sides timed in the same iterations)"
        + ("; * = timed as CUDA graph replays." if any(c["graph"] for c in cases) else ".")
    )
    lines.append("")
    for note in notes:
        lines += _wrap(note, wide)
    hidden = [
        _COLUMNS[k][0]
        for k in _COLUMNS
        if k not in shown and k != "sep" and k in _WIDE_ONLY + _DROP_ORDER
    ]
    if hidden:
        lines += _wrap(f"more columns ({', '.join(hidden)}): --wide, or --json", wide)
    graph_notes = sorted({c["graph_note"] for c in cases if c.get("graph_note")})
    for n in graph_notes:
        lines += _wrap(f"ll: {n}", wide)
    for c in cases:
        for m in c["mismatches"] + c["baseline"]["mismatches"]:
            lines += _wrap(f"MISMATCH {c['case']}: {m}", wide)
    lines.append(f"overall: {doc['status']}")
    return "\n".join(lines)


def write_json(doc: dict[str, Any], path: str) -> None:
    """Writes the JSON document (indented)."""
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")

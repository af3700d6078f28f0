"""Output of ``ep-bench``: the text table, the JSON document and the optional PNG plot.

Runs in the CLI process on the records rank 0 wrote. matplotlib is optional: it is imported only
by :func:`write_plot`, and :func:`require_matplotlib` lets the CLI fail before any rank starts.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BYTE_COUNTING",
    "IN_GRAPH_CALLS",
    "build_document",
    "format_table",
    "git_commit",
    "require_matplotlib",
    "write_json",
    "write_plot",
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
        "max over ranks of each rank's median (p10/p90 likewise) of whole calls (CUDA events; "
        "before each: L2 flush, barrier and, on GPUs, a sleep kernel + one-element all-reduce "
        "as a shared start line; EP_CHECK_INPUTS off); bytes are the mean per rank."
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


def _sms(case: dict[str, Any]) -> str:
    if case["mode"] != "ht":
        return "-"
    if case["num_sms"] == 0:
        return f"auto:{case['num_sms_used']}" if case["num_sms_used"] else "auto"
    return str(case["num_sms"])


_COLUMNS = (
    ("mode", 4, "<"),
    ("op", 8, "<"),
    ("dtype", 5, "<"),
    ("sms", 7, ">"),
    ("tokens", 6, ">"),
    ("check", 5, "<"),
    ("med_us", 9, ">"),
    ("p10_us", 9, ">"),
    ("p90_us", 9, ">"),
    ("GB/s", 7, ">"),
    ("dpep", 7, ">"),
    ("kern_us", 8, ">"),
    ("kGB/s", 7, ">"),
    (f"g{IN_GRAPH_CALLS}_us", 7, ">"),
    ("rem_MB", 8, ">"),
    ("rem_GB/s", 8, ">"),
    ("|", 1, "<"),
    ("base_us", 9, ">"),
    ("base_GB/s", 9, ">"),
    ("base_rem", 8, ">"),
    ("base", 5, "<"),
    ("speedup", 7, ">"),
)


def _row(values: Sequence[str]) -> str:
    return " ".join(f"{v:{a}{w}}" for v, (_, w, a) in zip(values, _COLUMNS, strict=True)).rstrip()


def format_table(doc: dict[str, Any]) -> str:
    """The human-readable table of a JSON document, with its notes."""
    meta = doc["meta"]
    lines = [
        f"ep-bench: {meta['num_ranks']} ranks on {meta['device']}, backend "
        f"{meta['backend_name']!r} (reference 'torch'), torch {meta['torch']}",
        _row([name for name, _, _ in _COLUMNS]),
    ]
    for c in doc["cases"]:
        lat, base = c["latency_us"], c["baseline"]
        base_status = {"PASS": "PASS", "FAIL": "FAIL"}.get(base["status"], "-")
        speedup = base["latency_us"]["median"] / lat["median"] if lat["median"] > 0 else 0.0
        op = c["op"] + ("*" if c["graph"] else "")
        values = [
            c["mode"],
            op,
            c["dtype"],
            _sms(c),
            str(c["num_tokens"]),
            c["status"],
            f"{lat['median']:.1f}",
            f"{lat['p10']:.1f}",
            f"{lat['p90']:.1f}",
            f"{c['gbps']['logical']:.2f}",
            f"{c['gbps']['deepep']:.2f}",
            "-" if c.get("kernel_us") is None else f"{c['kernel_us']:.1f}",
            "-" if c.get("kernel_gbps") is None else f"{c['kernel_gbps']['logical']:.2f}",
            "-" if c.get("in_graph_us") is None else f"{c['in_graph_us']:.1f}",
            f"{c['bytes']['remote'] / 1e6:.3f}",
            f"{c['gbps']['remote']:.2f}",
            "|",
            f"{base['latency_us']['median']:.1f}",
            f"{base['gbps']['logical']:.2f}",
            f"{base['gbps']['remote']:.2f}",
            base_status,
            f"{speedup:.2f}x",
        ]
        lines.append(_row(values))
    lines += [
        "",
        "GB/s = logical: " + BYTE_COUNTING["logical"],
        "dpep = " + BYTE_COUNTING["deepep"],
        "rem = " + BYTE_COUNTING["remote"],
        "times: " + BYTE_COUNTING["time"],
        BYTE_COUNTING["kernel"],
        BYTE_COUNTING["in_graph"],
        "base = plain all_to_all_single pipeline in the same run (its own rows for ll); "
        "speedup = base_us / med_us; * = timed as CUDA graph replays.",
    ]
    notes = sorted({c["graph_note"] for c in doc["cases"] if c.get("graph_note")})
    lines += [f"ll: {n}" for n in notes]
    for c in doc["cases"]:
        for m in c["mismatches"] + c["baseline"]["mismatches"]:
            lines.append(f"MISMATCH {c['case']}: {m}")
    lines.append(f"overall: {doc['status']}")
    return "\n".join(lines)


def require_matplotlib() -> None:
    """Raises ``RuntimeError`` with an install hint when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "--plot needs matplotlib, which is not installed (pip install matplotlib)"
        ) from exc


def _plot_kernel_curve(
    ax: Any, xs: Sequence[float], ys: Sequence[float | None], style: str, **kwargs: Any
) -> None:
    """Plots the points of ``ys`` that were measured (kernel times are ``None`` off CUDA)."""
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if points:
        ax.plot([x for x, _ in points], [y for _, y in points], style, **kwargs)


def write_plot(doc: dict[str, Any], path: str) -> None:
    """Writes a PNG: GB/s vs SMs per high-throughput op, latency vs tokens for low latency.

    Baselines are horizontal dashed lines (high throughput) or dashed curves (low latency).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = doc["cases"]
    panels = [
        ("ht", op)
        for op in ("dispatch", "combine")
        if any(c["mode"] == "ht" and c["op"] == op for c in cases)
    ]
    has_ll = any(c["mode"] == "ll" for c in cases)
    n = len(panels) + int(has_ll)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(5.5 * max(n, 1), 4.2), squeeze=False)
    colors = {"fp8": "tab:blue", "bf16": "tab:orange"}
    for ax, (_, op) in zip(axes[0], panels, strict=False):
        for dtype in ("fp8", "bf16"):
            rows = [c for c in cases if c["mode"] == "ht" and c["op"] == op and c["dtype"] == dtype]
            if not rows:
                continue
            rows.sort(key=lambda c: c["num_sms_used"] or c["num_sms"])
            xs = [c["num_sms_used"] or c["num_sms"] for c in rows]
            color = colors[dtype]
            ax.plot(xs, [c["gbps"]["logical"] for c in rows], "o-", color=color, label=dtype)
            _plot_kernel_curve(
                ax,
                xs,
                [(c.get("kernel_gbps") or {}).get("logical") for c in rows],
                "^:",
                color=color,
                label=f"{dtype} kernels only",
            )
            base = max(c["baseline"]["gbps"]["logical"] for c in rows)
            ax.axhline(base, color=color, linestyle="--", label=f"{dtype} all_to_all baseline")
        ax.set_title(f"HT {op} ({doc['meta']['num_ranks']} ranks)")
        ax.set_xlabel("SMs")
        ax.set_ylabel("logical GB/s per rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if has_ll:
        ax = axes[0][len(panels)]
        for dtype in ("fp8", "bf16"):
            for op, marker in (("dispatch", "o"), ("combine", "s")):
                rows = [
                    c for c in cases if c["mode"] == "ll" and c["op"] == op and c["dtype"] == dtype
                ]
                if not rows:
                    continue
                rows.sort(key=lambda c: c["num_tokens"])
                xs = [c["num_tokens"] for c in rows]
                color = colors[dtype]
                label = f"{op} {dtype}"
                ax.plot(
                    xs,
                    [c["latency_us"]["median"] for c in rows],
                    f"{marker}-",
                    color=color,
                    label=label,
                )
                _plot_kernel_curve(
                    ax,
                    xs,
                    [c.get("kernel_us") for c in rows],
                    f"{marker}:",
                    color=color,
                    alpha=0.8,
                    label=f"{label} kernel only",
                )
                base = [c["baseline"]["latency_us"]["median"] for c in rows]
                ax.plot(xs, base, f"{marker}--", color=color, alpha=0.5, label=f"{label} baseline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # the host-synchronising baseline is ~20-40x slower
        ax.set_title("LL latency")
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("median us (max over ranks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"ep-bench: {doc['meta']['device']}, backend {doc['meta']['backend_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(doc: dict[str, Any], path: str) -> None:
    """Writes the JSON document (indented)."""
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")

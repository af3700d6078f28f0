"""The optional PNG of ``ep-bench`` (``--plot``): what the run varied, beside the baseline.

matplotlib is optional: it is imported only by :func:`write_plot`, and :func:`require_matplotlib`
lets the CLI fail with a one-line install hint before any rank starts.

Each panel plots what varies in the run against the baseline (dashed): high-throughput GB/s over
the SM counts of an ``--num-sms`` sweep (one panel per op), low-latency call time over the token
counts of ``--ll-tokens``. Where a family has a single point (one SM count, one token count, as
on CPU) its panel is a bar per op and dtype, the baseline a dashed line across each bar and the
speedup (median and range over the repeats) written above it. Shaded bands and error bars span
p10 to p90; titles give PASS/FAIL and the shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["MATPLOTLIB_HINT", "require_matplotlib", "write_plot"]

MATPLOTLIB_HINT = (
    "--plot needs matplotlib, which is not installed: python -m pip install matplotlib"
)
"""The message of :func:`require_matplotlib` (``ep-bench`` prints it as its only line)."""

_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
"""One per curve (op and dtype); its baseline is the same color, dashed."""
_MARKERS = {"dispatch": "o", "combine": "s"}
_BAR_COLOR = "tab:blue"

Metric = Callable[[dict[str, Any]], tuple[float, float, float]]
"""``(value, low, high)`` of a case or of its baseline record."""


def require_matplotlib() -> None:
    """Raises ``RuntimeError(MATPLOTLIB_HINT)`` when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(MATPLOTLIB_HINT) from exc


def _gbps(rec: dict[str, Any]) -> tuple[float, float, float]:
    """Logical GB/s, and the GB/s of the p90 and p10 times."""
    lat, value = rec["latency_us"], rec["gbps"]["logical"]
    low = value * lat["median"] / lat["p90"] if lat["p90"] > 0 else value
    high = value * lat["median"] / lat["p10"] if lat["p10"] > 0 else value
    return value, low, high


def _latency(rec: dict[str, Any]) -> tuple[float, float, float]:
    lat = rec["latency_us"]
    return lat["median"], lat["p10"], lat["p90"]


def _status(cases: Sequence[dict[str, Any]]) -> str:
    bad = any(c["status"] != "PASS" or c["baseline"]["status"] == "FAIL" for c in cases)
    return "FAIL" if bad else "PASS"


def _speedup_text(case: dict[str, Any]) -> str:
    sp = case.get("speedup")
    if not sp:
        lat = case["latency_us"]["median"]
        return f"{case['baseline']['latency_us']['median'] / lat:.2f}x" if lat > 0 else ""
    if len(sp["per_repeat"]) < 2:
        return f"{sp['value']:.2f}x"
    return f"{sp['value']:.2f}x\n({sp['min']:.2f}-{sp['max']:.2f})"


def _series(cases: Sequence[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """``(op, dtype, cases)`` per op and dtype present, in a fixed order."""
    out = []
    for dtype in ("fp8", "bf16"):
        for op in ("dispatch", "combine"):
            rows = [c for c in cases if c["op"] == op and c["dtype"] == dtype]
            if rows:
                out.append((op, dtype, rows))
    return out


def _int_ticks(ax: Any, xs: Sequence[int], log: bool) -> None:
    from matplotlib.ticker import NullLocator

    ticks = sorted(set(xs))
    if log:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, labels=[str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] - 1, ticks[0] + 1)


def _line_panel(
    ax: Any,
    cases: Sequence[dict[str, Any]],
    x_of: Callable[[dict[str, Any]], int],
    metric: Metric,
    kernel: Callable[[dict[str, Any]], float | None],
    log_x: bool,
) -> None:
    """One curve per op and dtype over ``x_of``, a p10-p90 band, the baseline dashed."""
    from matplotlib.lines import Line2D

    xs_all = []
    kernels_shown = False
    for i, (op, dtype, rows) in enumerate(_series(cases)):
        rows = sorted(rows, key=x_of)
        xs = [x_of(c) for c in rows]
        xs_all += xs
        color, marker = _COLORS[i % len(_COLORS)], _MARKERS[op]
        ours = [metric(c) for c in rows]
        base = [metric(c["baseline"]) for c in rows]
        label = f"{op} {dtype}"
        ax.plot(xs, [v for v, _, _ in ours], f"{marker}-", color=color, label=f"{label} (p10-p90)")
        ax.fill_between(
            xs,
            [lo for _, lo, _ in ours],
            [hi for _, _, hi in ours],
            color=color,
            alpha=0.12,
            linewidth=0,
        )
        ax.plot(
            xs,
            [v for v, _, _ in base],
            f"{marker}--",
            color=color,
            alpha=0.6,
            mfc="none",
        )
        kern = [(x, kernel(c)) for x, c in zip(xs, rows, strict=True)]
        kern = [(x, k) for x, k in kern if k is not None]
        if kern:
            ax.plot(
                [x for x, _ in kern],
                [k for _, k in kern],
                f"{marker}:",
                color=color,
                alpha=0.8,
            )
            kernels_shown = True
    _int_ticks(ax, xs_all, log_x)
    # One legend entry per curve; the line styles of baselines and kernel times once, in black.
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="black", linestyle="--", label="all_to_all baseline"))
    if kernels_shown:
        handles.append(Line2D([], [], color="black", linestyle=":", label="kernels only"))
    ax.legend(handles=handles, fontsize=7)


def _bar_panel(ax: Any, cases: Sequence[dict[str, Any]], metric: Metric) -> None:
    """A bar per op and dtype with p10-p90 error bars; the baseline a dashed line across it."""
    series = _series(cases)
    labels = []
    top_all = 0.0
    for i, (op, dtype, rows) in enumerate(series):
        case = rows[0]
        value, low, high = metric(case)
        bvalue, _, _ = metric(case["baseline"])
        ax.bar(
            i,
            value,
            width=0.6,
            color=_BAR_COLOR,
            alpha=0.85,
            yerr=[[value - low], [high - value]],
            capsize=4,
            label="ElasticBuffer: median, p10-p90" if i == 0 else None,
        )
        ax.hlines(
            bvalue,
            i - 0.4,
            i + 0.4,
            colors="black",
            linestyles="--",
            label="all_to_all baseline" if i == 0 else None,
        )
        top = max(high, bvalue)
        top_all = max(top_all, top)
        ax.annotate(
            _speedup_text(case),
            (i, top),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            va="bottom",
            fontsize=8,
        )
        labels.append(f"{op}\n{dtype}")
    ax.set_xticks(range(len(series)), labels=labels)
    ax.set_xlim(-0.6, len(series) - 0.4)
    ax.set_ylim(0, top_all * 1.6)  # room for the speedups, and the legend above them
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    handles.append(
        Line2D([], [], linestyle="none", label="1.50x (1.25-1.75): speedup (range over repeats)")
    )
    ax.legend(handles=handles, fontsize=7, loc="upper left")


def _log_y_if_wide(ax: Any, cases: Sequence[dict[str, Any]]) -> None:
    """Log y with plain labels when the times span more than 20x (GPU: the baseline is slower)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    times = [t for c in cases for t in (_latency(c)[0], _latency(c["baseline"])[0]) if t > 0]
    if not times or max(times) < 20 * min(times):
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _kernel_gbps(case: dict[str, Any]) -> float | None:
    return (case.get("kernel_gbps") or {}).get("logical")


def _panels(cases: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``(kind, cases)`` per panel: ``ht-sms:<op>``, ``ht-bars``, ``ll-tokens`` or ``ll-bars``."""
    ht = [c for c in cases if c["mode"] == "ht"]
    ll = [c for c in cases if c["mode"] == "ll"]
    out: list[tuple[str, list[dict[str, Any]]]] = []
    if len({c["num_sms"] for c in ht}) > 1:
        for op in ("dispatch", "combine"):
            rows = [c for c in ht if c["op"] == op]
            if rows:
                out.append((f"ht-sms:{op}", rows))
    elif ht:
        out.append(("ht-bars", ht))
    if len({c["num_tokens"] for c in ll}) > 1:
        out.append(("ll-tokens", ll))
    elif ll:
        out.append(("ll-bars", ll))
    return out


def _shape(doc: dict[str, Any]) -> str:
    cfg = doc.get("config") or {}
    if "hidden" not in cfg:
        return ""
    return (
        f"H={cfg['hidden']}, top-{cfg['num_topk']} of {cfg['num_experts']} experts, "
        f"{cfg['routing']} routing"
    )


def write_plot(doc: dict[str, Any], path: str) -> None:
    """Writes a PNG of the run (see the module's description) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(doc["cases"])
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.6 * n, 4.8), squeeze=False)
    for ax, (kind, rows) in zip(axes[0], panels, strict=False):
        status = _status(rows)
        tokens = rows[0]["num_tokens"]
        if kind.startswith("ht-sms:"):
            op = kind.split(":")[1]
            _line_panel(
                ax,
                rows,
                lambda c: c["num_sms_used"] or c["num_sms"],
                _gbps,
                _kernel_gbps,
                log_x=False,
            )
            ax.set_title(f"HT {op}, {tokens} tokens/rank: {status}")
            ax.set_xlabel("SMs")
        elif kind == "ht-bars":
            _bar_panel(ax, rows, _gbps)
            ax.set_title(f"HT dispatch/combine, {tokens} tokens/rank: {status}")
        elif kind == "ll-tokens":
            xs = [c["num_tokens"] for c in rows]
            _line_panel(
                ax,
                rows,
                lambda c: c["num_tokens"],
                _latency,
                lambda c: c.get("kernel_us"),
                log_x=max(xs) >= 8 * min(xs),
            )
            _log_y_if_wide(ax, rows)
            ax.set_title(f"LL latency: {status}")
            ax.set_xlabel("tokens per rank")
        else:
            _bar_panel(ax, rows, _latency)
            ax.set_title(f"LL latency, {tokens} tokens/rank: {status}")
        if kind.startswith("ht"):
            ax.set_ylabel("logical GB/s per rank (higher is better)")
        else:
            ax.set_ylabel("us per call, max over ranks (lower is better)")
        ax.grid(alpha=0.3)
    meta = doc["meta"]
    head = (
        f"ep-bench {doc['status']}: {meta['num_ranks']} ranks on {meta['device']}, "
        f"backend {meta['backend_name']}"
    )
    shape = _shape(doc)
    fig.suptitle(
        f"{head}\n{shape}" if shape else head,
        fontsize=10,
        color="black" if doc["status"] == "PASS" else "tab:red",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

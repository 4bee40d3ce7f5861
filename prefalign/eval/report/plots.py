"""The report's PNG plots: gold vs KL (with the sweep's frontiers), training curves, gold vs wall time, the online
arms' over-optimisation curves.

Matplotlib is imported inside the functions: importing the report must not load it (or choose a backend).
"""

from __future__ import annotations

from pathlib import Path

from prefalign.eval.report.values import CURVE_METRICS, START, error_bar, is_number, stat, trained, wall


def _figure(width: float, height: float):
    """A figure on the Agg canvas. No pyplot: nothing global changes (the caller's backend stays), no GUI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(arms: list[dict]) -> dict[str, object]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors  # type: ignore[attr-defined]  # tab10 is a ListedColormap
    return {START: "0.35", **{arm["name"]: palette[index % len(palette)] for index, arm in enumerate(trained(arms))}}


def _draw_sweeps(ax, sweep: list[dict], colors: dict, labels: dict[str, str]) -> bool:
    """One dashed frontier per swept (arm, parameter), in KL order; False when no point has both numbers."""
    drawn = False
    for arm, param in dict.fromkeys((point["arm"], point["param"]) for point in sweep):
        points = sorted(
            (
                point
                for point in sweep
                if (point["arm"], point["param"]) == (arm, param)
                and is_number(point.get("kl_mean"))
                and is_number(point.get("gold_mean"))
            ),
            key=lambda point: point["kl_mean"],
        )
        if not points:
            continue
        ax.errorbar(
            [point["kl_mean"] for point in points],
            [point["gold_mean"] for point in points],
            xerr=_seed_errors(points, "kl"),
            yerr=_seed_errors(points, "gold"),
            fmt="--",
            marker="s",
            ms=4,
            capsize=2,
            alpha=0.75,
            color=colors.get(arm, "0.5"),
            label=f"{labels.get(arm, arm)}: sweep over {param}",
            zorder=2,
        )
        for point in points:
            ax.annotate(
                f"{param}={point['value']:g}",
                (point["kl_mean"], point["gold_mean"]),
                textcoords="offset points",
                xytext=(5, -11),
                fontsize=7,
                color="0.3",
            )
        drawn = True
    return drawn


def _seed_errors(points: list[dict], key: str) -> list[list[float]] | None:
    """Asymmetric error bars of ``point[key]`` seed intervals (None when a point has none: one seed, old summaries)."""
    found = [point.get(key) or {} for point in points]
    if not all(is_number(f.get("low")) and is_number(f.get("high")) and is_number(f.get("mean")) for f in found):
        return None
    return [[f["mean"] - f["low"] for f in found], [f["high"] - f["mean"] for f in found]]


def _plot_overoptimisation(arms: list[dict], curves: list[dict], colors: dict, gold_axis: str, path: Path) -> bool:
    """Per online arm, gold (left) and the proxy's gain over step 0 (right; each seed's own reward model, so its own
    offset) on the held-out prompts against KL at the points its training evaluated (Gao, Schulman, Hilton 2022: the
    proxy keeps rising while gold peaks); seed intervals on both axes. Summaries without ``proxy_gain`` plot the raw
    proxy."""
    if not curves:
        return False
    labels = {arm["name"]: arm["label"] for arm in arms}
    fig = _figure(11, 4.6)
    panels = fig.subplots(1, 2)
    gain = all("proxy_gain" in point for curve in curves for point in curve["points"])
    for ax, key, ylabel in (
        (panels[0], "gold", gold_axis),
        (panels[1], *(("proxy_gain", "proxy gain over step 0") if gain else ("proxy", "proxy score"))),
    ):
        for curve in curves:
            points = curve["points"]
            ax.errorbar(
                [point["kl"]["mean"] for point in points],
                [point[key]["mean"] for point in points],
                xerr=_seed_errors(points, "kl"),
                yerr=_seed_errors(points, key),
                fmt="-",
                marker="o",
                ms=4,
                capsize=2,
                color=colors.get(curve["arm"], "0.5"),
                label=labels.get(curve["arm"], curve["arm"]),
            )
            for point in (points[0], points[-1]):
                ax.annotate(
                    f"step {point['step']}",
                    (point["kl"]["mean"], point[key]["mean"]),
                    textcoords="offset points",
                    xytext=(5, -11),
                    fontsize=7,
                    color="0.3",
                )
        ax.set_xlabel("KL(policy || start) on held-out prompts, nats per completion")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Over-optimisation: held-out gold and proxy during training, against KL")
    fig.savefig(path)
    return True


def _plot_gold_vs_kl(arms: list[dict], sweep: list[dict], colors: dict, gold_axis: str, path: Path) -> bool:
    fig = _figure(7.5, 5.2)
    ax = fig.add_subplot()
    drawn = False
    for arm in arms:
        kl_bar, gold_bar = error_bar(arm, "kl_mean"), error_bar(arm, "gold_mean")
        if kl_bar is None or gold_bar is None:
            continue
        (kl, kl_err), (gold, gold_err) = kl_bar, gold_bar
        ax.errorbar(
            kl,
            gold,
            xerr=kl_err,
            yerr=gold_err,
            fmt="o",
            ms=8,
            capsize=3,
            color=colors.get(arm["name"], "0.5"),
            label=arm["label"],
            zorder=3,
        )
        ax.annotate(arm["label"], (kl, gold), textcoords="offset points", xytext=(7, 6), fontsize=9)
        drawn = True
    drawn = _draw_sweeps(ax, sweep, colors, {arm["name"]: arm["label"] for arm in arms}) or drawn
    if not drawn:
        return False
    ax.axvline(0, color="0.8", lw=0.8, zorder=1)
    _finish(
        fig,
        ax,
        "KL(policy || start), nats per completion",
        gold_axis,
        "Gold reward vs KL to the starting policy (up and left is better)",
        path,
    )
    return True


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """Label a one-panel plot, grid and legend, and write it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)


def _plot_curves(arms: list[dict], colors: dict, path: Path) -> bool:
    curved = [arm for arm in arms if arm.get("curve")]
    metrics = list(dict.fromkeys(arm.get("curve_metric", "metric") for arm in curved))
    if not metrics:
        return False
    ncols = min(len(metrics), 3)
    nrows = -(-len(metrics) // ncols)
    fig = _figure(5.2 * ncols, 3.9 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    # One panel per metric: a PPO reward and a DPO margin are different units and must not share an axis.
    for ax, metric in zip(axes, metrics):
        for arm in curved:
            if arm.get("curve_metric", "metric") != metric:
                continue
            points = [
                (point["step"], point["metric"])
                for point in arm["curve"]
                if is_number(point.get("step")) and is_number(point.get("metric"))
            ]
            ax.plot(
                [step for step, _ in points],
                [value for _, value in points],
                marker="." if len(points) <= 40 else None,
                color=colors.get(arm["name"], "0.5"),
                label=arm["label"],
            )
        ax.set_xlabel("training step")
        ax.set_ylabel(metric)
        ax.set_title(CURVE_METRICS.get(metric, metric), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.suptitle("Training curves, one line per arm")
    fig.savefig(path)
    return True


def _plot_gold_vs_wall(arms: list[dict], colors: dict, gold_axis: str, path: Path) -> bool:
    bars = [(arm, wall(arm, "total"), error_bar(arm, "gold_mean")) for arm in trained(arms)]
    points = [(arm, seconds, *bar) for arm, seconds, bar in bars if is_number(seconds) and bar is not None]
    if not points:
        return False
    fig = _figure(7.5, 5.2)
    ax = fig.add_subplot()
    for arm, seconds, gold, gold_std in points:
        ax.errorbar(
            seconds,
            gold,
            yerr=gold_std,
            fmt="o",
            ms=8,
            capsize=3,
            color=colors.get(arm["name"], "0.5"),
            label=arm["label"],
            zorder=3,
        )
        ax.annotate(arm["label"], (seconds, gold), textcoords="offset points", xytext=(7, 6), fontsize=9)
    start = next((arm for arm in arms if arm["name"] == START), None)
    start_gold = stat(start, "gold_mean")[0] if start is not None else None
    if start is not None and start_gold is not None:
        ax.axhline(start_gold, ls="--", color=colors[START], lw=1, label=f"{start['label']} (no training)")
    ax.set_xlim(left=0, right=max(point[1] for point in points) * 1.15 or 1)
    _finish(
        fig, ax, "total wall time, s (pairs + reward model + policy)", gold_axis, "Gold reward vs wall-clock cost", path
    )
    return True


def draw_plots(summary: dict, out_dir: Path) -> dict[str, Path]:
    """Write the PNG plots that have data; returns ``{name: path}``."""
    arms, sweep = summary["arms"], summary.get("sweep") or []
    colors = _colors(arms)
    gold_axis = f"gold score, mean ({(summary.get('settings') or {}).get('judge', 'gold judge')})"
    jobs = {
        "gold_vs_kl": lambda path: _plot_gold_vs_kl(arms, sweep, colors, gold_axis, path),
        "training_curves": lambda path: _plot_curves(arms, colors, path),
        "gold_vs_wall_time": lambda path: _plot_gold_vs_wall(arms, colors, gold_axis, path),
        "overoptimisation": lambda path: _plot_overoptimisation(
            arms, summary.get("overoptimisation") or [], colors, gold_axis, path
        ),
    }
    return {name: out_dir / f"{name}.png" for name, draw in jobs.items() if draw(out_dir / f"{name}.png")}

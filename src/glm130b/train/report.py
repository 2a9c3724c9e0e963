"""What a run leaves for people: the loss-curve PNG and a Markdown report.

The curve reads the metrics files of glm130b.train.trainer (train loss per step, validation loss per
language, spike-guard interventions as vertical lines). matplotlib is optional (the `demo` extra):
without it the curve is skipped and the caller says so.
"""

from __future__ import annotations

from pathlib import Path

from glm130b.core.atomic import atomic_path, atomic_write_text
from glm130b.train.metrics import read_metrics


def last_per_step(records: list[dict]) -> list[dict]:
    """One record per step, the last written: steps replayed after a rollback or resume replace
    the earlier attempt."""
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(
    metrics_dir: str | Path, png_path: str | Path, baselines: dict[str, dict[str, float]] | None = None
) -> Path | None:
    """Train loss, validation loss per language and, from `baselines` ({name: {language: loss}},
    e.g. a unigram model's), a horizontal line per baseline in that language's colour."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [r for r in last_per_step(read_metrics(metrics_dir, "train")) if not r.get("skipped_update")]
    valid = last_per_step(read_metrics(metrics_dir, "valid"))
    interventions = read_metrics(metrics_dir, "intervention")
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    axes.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, color="0.6", label="train")
    for key in sorted({k for r in valid for k in r if k.startswith("loss_")}):
        language = key.removeprefix("loss_")
        points = [(r["step"], r[key]) for r in valid if r.get(key) is not None]
        [line] = axes.plot(*zip(*points), marker="o", ms=3, label=f"validation {language}")
        for (name, losses), style in zip((baselines or {}).items(), (":", "-.", "--")):
            if language in losses:
                axes.axhline(losses[language], color=line.get_color(), ls=style, lw=1, label=f"{name} {language}")
    for event in interventions:
        axes.axvline(event["step"], color="red", lw=0.6, ls="--")
    if interventions:
        axes.plot([], [], color="red", lw=0.6, ls="--", label="spike guard rollback")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per target token)")
    axes.grid(alpha=0.3)
    axes.legend()
    return save_png(figure, png_path)


def save_png(figure, png_path: str | Path) -> Path:
    """Lay out a matplotlib figure, write it atomically as PNG, and release it."""
    import matplotlib.pyplot as plt  # matplotlib is optional: only reached once a figure exists

    figure.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return png_path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """`sections`: (heading, Markdown body) pairs, in order."""
    path = Path(path)
    text = f"# {title}\n\n" + "\n\n".join(f"## {heading}\n\n{body.strip()}" for heading, body in sections) + "\n"
    atomic_write_text(path, text)
    return path

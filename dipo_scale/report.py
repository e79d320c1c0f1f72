"""A markdown report of evaluation metrics for one or more models, with PNG plots.

`write_report(out_dir, metrics_by_model, title, notes)` writes, each atomically (a temp file in
the same directory, then a rename):

* `report.md`: a table with one row per model and one column per metric (MUSE's criteria first);
* `criteria.png`: MUSE's criteria side by side across models (grouped bars: VerbMem / KnowMem on a
  0..100 scale, PrivLeak on its own axis), when any model has them;
* `tradeoff.png`: forget vs utility, one point per model: TOFU's forget quality (log scale) vs
  model utility when the models have both, else KnowMem forget vs KnowMem retain;
* `attacks_<model>.png`: with attacks, each criterion of a model before and after each attack.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from dipo_scale.files import atomic_write_text, follow_umask

CI = "_ci"  # metrics: `<name>_ci` is [low, high], the bootstrap 95 % interval of <name>

# key -> (column header, direction)
LABELS = {
    "verbmem_f": ("VerbMem forget", "↓"),
    "knowmem_f": ("KnowMem forget", "↓"),
    "knowmem_r": ("KnowMem retain", "↑"),
    "mia_auc": ("MIA AUC (Min-40%)", ""),
    "privleak": ("PrivLeak", "→0"),
    "forget_quality": ("Forget quality", "↑"),
    "model_utility": ("Model utility", "↑"),
    "forget_truth_ratio": ("Truth ratio forget", ""),
    "forget_prob": ("Prob. forget", ""),
}
CRITERIA = ("verbmem_f", "knowmem_f", "knowmem_r")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _columns(metrics_by_model: dict[str, dict]) -> list[str]:
    keys: list[str] = []
    for metrics in metrics_by_model.values():
        keys += [k for k, v in metrics.items() if _is_number(v) and k not in keys]
    known = [k for k in LABELS if k in keys]
    return known + [k for k in keys if k not in LABELS]


def _fmt(value: Any) -> str:
    if not _is_number(value):
        return "–"
    value = float(value)
    if math.isnan(value):
        return "nan"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"


def _header(key: str) -> str:
    label, direction = LABELS.get(key, (key, ""))
    return f"{label} {direction}".strip()


def _cell(metrics: dict, key: str) -> str:
    """The value, with its bootstrap 95 % interval `<key>_ci` ([low, high]) where there is one."""
    interval = metrics.get(f"{key}{CI}")
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        return f"{_fmt(metrics.get(key))} [{_fmt(interval[0])}, {_fmt(interval[1])}]"
    return _fmt(metrics.get(key))


def markdown_table(metrics_by_model: dict[str, dict]) -> str:
    """One row per model; a value in brackets after a metric is its bootstrap 95 % interval."""
    cols = _columns(metrics_by_model)
    lines = ["| model | " + " | ".join(_header(c) for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, metrics in metrics_by_model.items():
        lines.append(f"| {name} | " + " | ".join(_cell(metrics, c) for c in cols) + " |")
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    """fig as PNG at `path`: written to a temp name in the same directory, then renamed."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        follow_umask(tmp)  # (mkstemp makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def _plot_criteria(metrics_by_model: dict[str, dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    criteria = [k for k in CRITERIA if any(_is_number(m.get(k)) for m in metrics_by_model.values())]
    leak = {n: m["privleak"] for n, m in metrics_by_model.items() if _is_number(m.get("privleak"))}
    if not criteria and not leak:
        return False
    names = [n for n, m in metrics_by_model.items() if any(_is_number(m.get(k)) for k in criteria)]
    panels = (1 if criteria else 0) + (1 if leak else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels + 1.5, 4.2), squeeze=False)
    axes = list(axes[0])
    if criteria:
        ax = axes.pop(0)
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            values = [metrics_by_model[name].get(k) for k in criteria]
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(criteria))]
            ax.bar(xs, [float(v) if _is_number(v) else math.nan for v in values], width, label=name)
        ax.set_xticks(range(len(criteria)))
        ax.set_xticklabels([_header(k) for k in criteria])
        ax.set_ylabel("score (0..100)")
        ax.set_ylim(0, 105)
        ax.set_title("MUSE criteria per model")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    if leak:
        ax = axes.pop(0)
        ax.bar(range(len(leak)), list(leak.values()), color="tab:purple")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(leak)))
        ax.set_xticklabels(list(leak), rotation=20, ha="right")
        ax.set_ylabel("PrivLeak (0 is ideal)")
        ax.set_title("PrivLeak per model")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def _plot_tradeoff(metrics_by_model: dict[str, dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def points(x_key: str, y_key: str) -> dict[str, tuple[float, float]]:
        return {n: (float(m[x_key]), float(m[y_key])) for n, m in metrics_by_model.items()
                if _is_number(m.get(x_key)) and _is_number(m.get(y_key))}

    tofu = points("forget_quality", "model_utility")
    pts, x_key, y_key = (tofu, "forget_quality", "model_utility") if tofu else \
        (points("knowmem_f", "knowmem_r"), "knowmem_f", "knowmem_r")
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, (x, y) in pts.items():
        ax.scatter([x], [y], s=70, alpha=0.85, label=name)
    if tofu:
        ax.set_xscale("log")
        ax.set_xlabel("Forget quality (KS-test p-value, higher is better)")
        ax.set_ylabel("Model utility (higher is better)")
        ax.set_ylim(-0.02, 1.02)
    else:
        ax.set_xlabel("KnowMem on forget (lower is better)")
        ax.set_ylabel("KnowMem on retain (higher is better)")
        ax.set_xlim(-5, 105)
        ax.set_ylim(-5, 105)
    ax.set_title(f"Forget vs utility: {_header(x_key)} vs {_header(y_key)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def _plot_series(name: str, x_key: str, records: list[dict], path: Path) -> None:
    """Each metric against `x_key` (forget-set size, request index), one line per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [r[x_key] for r in records]
    for key in _columns({str(i): r for i, r in enumerate(records)}):
        if key != x_key and all(_is_number(r.get(key)) for r in records):
            ax.plot(xs, [r[key] for r in records], marker="o", label=_header(key))
    ax.set_xlabel(x_key)
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    save_figure(fig, path)


def _slug(name: str) -> str:
    """A file-name stem for a section's plot: lower case, every other character an underscore."""
    return "".join(c if c.isalnum() else "_" for c in name.lower())


def series_section(out_dir: str | Path, name: str, x_key: str, records: list[dict]) -> list[str]:
    """A report section for metrics over a sequence of runs — MUSE's scalability (x = forget-set
    size) or sustainability (x = request index): a table and `<name>.png`. Returns its lines."""
    slug = _slug(name)
    _plot_series(name, x_key, records, Path(out_dir) / f"{slug}.png")
    table = markdown_table({f"{x_key} = {r[x_key]}": {k: v for k, v in r.items() if k != x_key}
                            for r in records})
    return [f"## {name}", "", table, "", f"![{name}]({slug}.png)", ""]


ATTACKED = ("verbmem_f", "knowmem_f", "knowmem_r", "mia_auc", "privleak", "forget_quality", "model_utility")


def _signed(value: Any) -> str:
    return "–" if not _is_number(value) else ("+" if value >= 0 else "") + _fmt(value)


def _plot_attacks(name: str, before: dict, attacked: dict[str, dict], keys: list[str], path: Path) -> None:
    """One panel per criterion: the model's value before and after each attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys) + 1, 3.6), squeeze=False)
    labels = ["before", *attacked]
    for ax, key in zip(axes[0], keys):
        values = [before.get(key)] + [attacked[a].get(key, (None, None))[0] for a in attacked]
        ax.bar(range(len(labels)), [float(v) if _is_number(v) else math.nan for v in values],
               color=["tab:gray"] + ["tab:red"] * len(attacked))
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize="small")
        ax.set_title(_header(key), fontsize="medium")
        if key == "forget_quality":
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{name}: criteria after each attack")
    fig.tight_layout()
    save_figure(fig, path)


def attacks_section(out_dir: str | Path, name: str, before: dict, attacked: dict[str, dict]) -> list[str]:
    """The robustness of one model: a table (criterion, before, after each attack with its
    recovery, after - before) and `attacks_<name>.png`. `attacked`: {attack: {metric: (after,
    recovery)}}. Returns the section's lines."""
    keys = [k for k in ATTACKED if _is_number(before.get(k)) and any(k in m for m in attacked.values())]
    if not keys:
        return []
    slug = _slug(name)
    _plot_attacks(name, before, attacked, keys, Path(out_dir) / f"attacks_{slug}.png")
    lines = [f"### {name}", "", "| criterion | before | " + " | ".join(f"{a} (recovery)" for a in attacked) + " |",
             "|---|---|" + "---|" * len(attacked)]
    for key in keys:
        cells = [f"{_fmt(after)} ({_signed(recovery)})" for after, recovery in
                 (attacked[a].get(key, (None, None)) for a in attacked)]
        lines.append(f"| {_header(key)} | {_fmt(before[key])} | " + " | ".join(cells) + " |")
    return lines + ["", f"![{name} under attack](attacks_{slug}.png)", ""]


def write_report(out_dir: str | Path, metrics_by_model: dict[str, dict], title: str,
                 notes: list[str], series: dict[str, tuple[str, list[dict]]] | None = None,
                 attacks: dict[str, tuple[dict, dict[str, dict]]] | None = None) -> None:
    """report.md (a table of every numeric metric per model, the notes) and the plots in `out_dir`.

    `series` adds sections such as {"Scalability": ("forget_size", [{...metrics}, ...]),
    "Sustainability": ("request", [...])}, each with its table and plot. `attacks` ({model name:
    (its metrics before, {attack: {metric: (after, recovery)}})}, `eval.attacks.split_metrics`)
    adds a robustness section: per model, a table and `attacks_<model>.png`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", markdown_table(metrics_by_model), ""]
    if any(k.endswith(CI) for m in metrics_by_model.values() for k in m):
        lines += ["[low, high]: bootstrap 95 % interval (1000 resamples of the forget and holdout items).", ""]
    if _plot_criteria(metrics_by_model, out / "criteria.png"):
        lines += ["![MUSE criteria per model](criteria.png)", ""]
    if _plot_tradeoff(metrics_by_model, out / "tradeoff.png"):
        lines += ["![forget vs utility](tradeoff.png)", ""]
    lines += ["↓ lower is better, ↑ higher is better, →0 closest to zero is best. MUSE scores are on "
              "0..100; TOFU's forget quality, model utility and its components on 0..1.", ""]
    for name, (x_key, records) in (series or {}).items():
        lines += series_section(out, name, x_key, records)
    if attacks:
        lines += ["## Robustness to attacks", "",
                  "Each criterion after the attack, and in parentheses its recovery (after − before; for "
                  "forget criteria, a rise towards the target model's value is knowledge coming back).", ""]
        for name, (before, attacked) in attacks.items():
            lines += attacks_section(out, name, before, attacked)
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    atomic_write_text(out / "report.md", "\n".join(lines))

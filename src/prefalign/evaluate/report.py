"""A self-contained HTML report (plots embedded as PNG data URIs), ``metrics.json`` and a Markdown
summary for the terminal. The report is meant to be looked at: one chart per question, every
number with its interval and sample size, and real responses next to the numbers. Each model is
also compared with the baseline model on the same items: the difference with its 95% paired
bootstrap interval, marked where the interval excludes 0."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from prefalign.data.io import write_text_atomic
from prefalign.evaluate.stats import Estimate
from prefalign.score.agreement import Agreement


@dataclass
class MetricInfo:
    name: str
    label: str
    higher_is_better: bool | None  # None: neither (e.g. KL is a budget, not a goal)
    description: str = ""


@dataclass
class EvalResult:
    title: str
    models: list[str]
    metrics: dict[str, dict[str, Estimate]]  # metric name -> model -> estimate
    info: dict[str, MetricInfo]
    examples: dict[str, list[dict]] = field(default_factory=dict)  # set name -> [{prompt, model: response...}]
    training_logs: dict[str, list[dict]] = field(default_factory=dict)  # run label -> train_log rows
    reward_vs_kl: list[dict] = field(default_factory=list)  # [{label, kl, kl_stderr, reward, reward_stderr}]
    curve_comparisons: list[dict] = field(default_factory=list)  # evaluate/frontier.py, per prompt set
    notes: list[str] = field(default_factory=list)
    contrast_agreement: list[Agreement] = field(default_factory=list)  # per contrast, from scored pairs
    baseline: str | None = None  # the model every other one is compared with
    # metric name -> model -> difference to the baseline (kind "difference": mean(model) − mean(baseline);
    # kind "relative": ratio − 1), each with its 95% paired bootstrap interval
    differences: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    # metric name -> "a − b" -> the config's comparisons, two trained models head to head, as above
    head_to_head: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    bootstrap: dict = field(default_factory=dict)  # {"samples": B, "seed": seed}

    def to_json(self) -> dict:
        return {
            "title": self.title,
            "models": self.models,
            "metrics": {m: {k: e.as_dict() for k, e in per.items()} for m, per in self.metrics.items()},
            "info": {k: vars(v) for k, v in self.info.items()},
            "reward_vs_kl": self.reward_vs_kl,
            "curve_comparisons": self.curve_comparisons,
            "notes": self.notes,
            "contrast_agreement": [a.as_dict() for a in self.contrast_agreement],
            "baseline": self.baseline,
            "differences": {m: {k: e.as_dict() for k, e in per.items()} for m, per in self.differences.items()},
            "head_to_head": {m: {k: e.as_dict() for k, e in per.items()} for m, per in self.head_to_head.items()},
            "bootstrap": self.bootstrap,
        }

    @property
    def compared(self) -> list[str]:
        """The models with a difference to the baseline, in model order."""
        return [m for m in self.models if m != self.baseline and any(m in per for per in self.differences.values())]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def metric_bars(result: EvalResult) -> str | None:
    names = [m for m in result.metrics if any(e.n for e in result.metrics[m].values())]
    if not names:
        return None
    plt = _pyplot()
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        per = result.metrics[name]
        labels = [m for m in result.models if m in per]
        values = [per[m].value for m in labels]
        err_low = [max(0.0, per[m].value - per[m].low) if not math.isnan(per[m].low) else 0 for m in labels]
        err_high = [max(0.0, per[m].high - per[m].value) if not math.isnan(per[m].high) else 0 for m in labels]
        ax.bar(range(len(labels)), values, yerr=[err_low, err_high], capsize=4,
               color=[COLOURS[result.models.index(m) % len(COLOURS)] for m in labels])
        ax.set_xticks(range(len(labels)), labels, rotation=15)
        info = result.info.get(name)
        arrow = {True: " (higher is better)", False: " (lower is better)"}.get(info.higher_is_better if info else None, "")
        ax.set_title((info.label if info else name) + arrow, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def training_curves(logs: dict[str, list[dict]]) -> str | None:
    keys = [("loss", "loss"), ("rewards/margin", "implicit reward margin"), ("rewards/accuracy", "preference accuracy")]
    if not any(logs.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.0), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for i, (run, rows) in enumerate(logs.items()):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), label=run, color=COLOURS[i % len(COLOURS)])
            evals = [(r["step"], r[f"eval/{key}"]) for r in rows if f"eval/{key}" in r]
            if evals:
                ax.plot(*zip(*evals), "o--", color=COLOURS[i % len(COLOURS)], label=f"{run} (eval)")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def reward_kl_plot(points: Sequence[dict]) -> str | None:
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, p in enumerate(points):
        ax.errorbar(p["kl"], p["reward"], xerr=p.get("kl_stderr") or 0, yerr=p.get("reward_stderr") or 0,
                    fmt="o", color=COLOURS[i % len(COLOURS)], capsize=3, label=p["label"])
    ax.set_xlabel("KL(π ‖ π_ref), nats per response")
    ax.set_ylabel("reward")
    ax.set_title("reward vs KL (up and to the left is better)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def agreement_plot(rows: Sequence[Agreement]) -> str | None:
    rows = [r for r in rows if r.estimate.n]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    values = [r.estimate.value for r in rows]
    # Clamped at 0: a Wilson bound of a share of 1 (or 0) can land a rounding error inside the
    # value, and matplotlib rejects a negative error bar.
    errors = [[max(0.0, v - r.estimate.low) for v, r in zip(values, rows)],
              [max(0.0, r.estimate.high - v) for v, r in zip(values, rows)]]
    ax.barh(ys, values, xerr=errors, capsize=3, color=[COLOURS[i % len(COLOURS)] for i in range(len(rows))])
    ax.set_yticks(ys, [f"{r.group} (n={r.estimate.n})" for r in rows])
    ax.axvline(0.5, color="#888", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of pairs where the scorer prefers chosen (0.5 = chance)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def agreement_table_html(rows: Sequence[Agreement]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(r.group)}</td><td class='num'>{r.pairs}</td><td class='num'>{r.agree}</td>"
        f"<td class='num'>{r.disagree}</td><td class='num'>{r.ties}</td><td class='num'>{r.unscored}</td>"
        + _cell(r.estimate, False) + "</tr>"
        for r in rows
    )
    return ("<table><tr><th>contrast</th><th>pairs</th><th>agree</th><th>disagree</th><th>ties</th><th>unscored</th>"
            f"<th>share agreeing</th></tr>{body}</table>")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;width:100%;font-size:.9em} th,td{border:1px solid #ddd;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f4f6f8} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.best{background:#e8f5e9;font-weight:600} td.better{background:#e8f5e9} td.worse{background:#fdecea} .ci{color:#777;font-size:.85em} img{max-width:100%}
.note{color:#555;font-size:.9em} details{margin:.4em 0} pre{white-space:pre-wrap;margin:0;font-family:inherit}
"""


def _cell(estimate: Estimate | None, best: bool) -> str:
    if estimate is None or estimate.n == 0:
        return '<td class="num">n/a</td>'
    ci = "" if math.isnan(estimate.low) else f'<br><span class="ci">[{estimate.low:.3f}, {estimate.high:.3f}] n={estimate.n}</span>'
    return f'<td class="num{" best" if best else ""}">{estimate.value:.3f}{ci}</td>'


def _best_model(result: EvalResult, name: str) -> str | None:
    info = result.info.get(name)
    per = {m: e for m, e in result.metrics[name].items() if e.n and not math.isnan(e.value)}
    if not info or info.higher_is_better is None or len(per) < 2:
        return None
    pick = max if info.higher_is_better else min
    return pick(per, key=lambda m: per[m].value)


def metrics_table_html(result: EvalResult) -> str:
    head = "".join(f"<th>{html.escape(m)}</th>" for m in result.models)
    rows = []
    for name, per in result.metrics.items():
        info = result.info.get(name)
        best = _best_model(result, name)
        label = html.escape(info.label if info else name)
        desc = f'<br><span class="note">{html.escape(info.description)}</span>' if info and info.description else ""
        cells = "".join(_cell(per.get(m), m == best) for m in result.models)
        rows.append(f"<tr><td>{label}{desc}</td>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def format_difference(estimate: Estimate | None, marker: str = " *") -> str:
    """``-0.412 [-0.51, -0.31] *``: the difference, its 95% interval, and ``marker`` when the interval
    excludes 0; a relative change (``kind="relative"``) in percent."""
    if estimate is None or estimate.n == 0 or math.isnan(estimate.value):
        return "n/a"
    scale, unit, digits, ci_digits = (100.0, "%", 1, 1) if estimate.kind == "relative" else (1.0, "", 3, 2)
    text = f"{scale * estimate.value:+.{digits}f}{unit}"
    if not math.isnan(estimate.low):
        text += f" [{scale * estimate.low:+.{ci_digits}f}{unit}, {scale * estimate.high:+.{ci_digits}f}{unit}]"
    return text + (marker if estimate.excludes_zero() else "")


def difference_legend(result: EvalResult, what: str | None = None) -> str:
    boot = result.bootstrap or {}
    resamples = f"{boot['samples']} resamples" if "samples" in boot else "resampled"
    what = what or f"model − {result.baseline}"
    return (f"Δ = {what} on the same prompts / pairs / texts (mean of per-item values; perplexity on "
            f"reference text: relative change of the pooled perplexity, ratio − 1, in %); [95% paired bootstrap "
            f"percentile interval, {resamples}]; * = the interval excludes 0.")


def head_to_head_legend(result: EvalResult) -> str:
    return difference_legend(result, "the first model − the second")


def _difference_cell(estimate: Estimate | None, higher_is_better: bool | None) -> str:
    if estimate is None or estimate.n == 0 or math.isnan(estimate.value):
        return '<td class="num">n/a</td>'
    value, _, interval = format_difference(estimate, "").partition(" ")
    css = ""
    if estimate.excludes_zero() and higher_is_better is not None:
        css = " better" if (estimate.value > 0) == higher_is_better else " worse"
    star = " *" if estimate.excludes_zero() else ""
    ci = f'<br><span class="ci">{html.escape(interval)} n={estimate.n}</span>' if interval else ""
    return f'<td class="num{css}">{html.escape(value)}{star}{ci}</td>'


def _columns(table: dict[str, dict[str, Estimate]]) -> list[str]:
    """A difference table's columns, in the order they first appear."""
    return list(dict.fromkeys(column for per in table.values() for column in per))


def _difference_table_html(result: EvalResult, table: dict[str, dict[str, Estimate]], columns: dict[str, str]) -> str:
    """``columns``: key in ``table`` -> header."""
    head = "".join(f"<th>{html.escape(header)}</th>" for header in columns.values())
    rows = []
    for name, per in table.items():
        info = result.info.get(name)
        label = html.escape(info.label if info else name)
        cells = "".join(_difference_cell(per.get(key), info.higher_is_better if info else None) for key in columns)
        rows.append(f"<tr><td>{label}</td>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def differences_table_html(result: EvalResult) -> str:
    return _difference_table_html(result, result.differences, {m: f"{m} − {result.baseline}" for m in result.compared})


def head_to_head_table_html(result: EvalResult) -> str:
    return _difference_table_html(result, result.head_to_head, {c: c for c in _columns(result.head_to_head)})


def examples_html(examples: dict[str, list[dict]], models: Sequence[str]) -> str:
    parts = []
    for set_name, items in examples.items():
        head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
        rows = []
        for item in items:
            cells = "".join(f"<td><pre>{html.escape(str(item.get(m, '')))}</pre></td>" for m in models)
            rows.append(f"<tr><td><pre>{html.escape(str(item['prompt']))}</pre></td>{cells}</tr>")
        parts.append(f"<details open><summary>{html.escape(set_name)} ({len(items)} prompts)</summary>"
                     f"<table><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table></details>")
    return "".join(parts)


def render_html(result: EvalResult) -> str:
    sections = [f"<h1>{html.escape(result.title)}</h1>"]
    sections += [f'<p class="note">{html.escape(n)}</p>' for n in result.notes]
    sections.append("<h2>Metrics</h2>" + metrics_table_html(result))
    if result.differences and result.compared:
        sections.append(f"<h2>Difference to {html.escape(str(result.baseline))}</h2>"
                        f'<p class="note">{html.escape(difference_legend(result))} Green: better, red: worse.</p>'
                        + differences_table_html(result))
    if result.head_to_head:
        sections.append("<h2>Head to head</h2>"
                        f'<p class="note">{html.escape(head_to_head_legend(result))} Green: the first model better, red: worse.</p>'
                        + head_to_head_table_html(result))
    plots = [("Metrics per model (95% intervals)", metric_bars(result)),
             ("Training curves", training_curves(result.training_logs)),
             ("Reward vs KL", reward_kl_plot(result.reward_vs_kl))]
    for title, uri in plots:
        if uri:
            sections.append(f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="{uri}">')
            if title == "Reward vs KL" and result.curve_comparisons:
                sections.append("<pre>" + html.escape("\n".join(curve_comparison_lines(result.curve_comparisons))) + "</pre>")
    if result.contrast_agreement:
        uri = agreement_plot(result.contrast_agreement)
        plot = f'<img alt="Contrast agreement" src="{uri}">' if uri else ""
        sections.append("<h2>Contrast agreement</h2><p class='note'>How often the scorer prefers the response each "
                        "contrast made the chosen one; ties and unscored pairs are left out of the share.</p>"
                        + agreement_table_html(result.contrast_agreement) + plot)
    if result.examples:
        sections.append("<h2>Example responses</h2>" + examples_html(result.examples, result.models))
    body = "\n".join(sections)
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(result.title)}</title><style>{CSS}</style></head><body>{body}</body></html>"


def curve_comparison_lines(comparisons: list[dict]) -> list[str]:
    """A table per comparison: each point of the first curve, the second read at its KL."""
    lines = []
    for c in comparisons:
        outside = len(c["points"]) - c["compared"]
        lines += [f"Reward vs KL [{c['prompt_set']}]: {c['first']} at or above {c['second']} at {c['at_or_above']} of "
                  f"{c['compared']} KL points" + (f" ({outside} outside {c['second']}'s KL range, not compared)" if outside else "")
                  + f" ({c['second']} interpolated linearly at {c['first']}'s KL)", "",
                  f"| {c['first']} model | KL | reward | {c['second']} at that KL | difference (95% paired bootstrap) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p['label']} | {p['kl']:.3f} | {p['reward']:.4f} | "
                  + ("outside its range" if p["other_reward"] is None else f"{p['other_reward']:.4f}") + " | "
                  + _curve_difference_cell(p) + " |" for p in c["points"]]
    return lines


def _curve_difference_cell(point: dict) -> str:
    if point.get("difference") is None:
        return "n/a"
    low, high = point.get("difference_low"), point.get("difference_high")
    if low is None or high is None or math.isnan(low):
        return f"{point['difference']:+.3f}"
    star = " *" if low > 0 or high < 0 else ""
    return f"{point['difference']:+.3f} [{low:+.3f}, {high:+.3f}]{star}"


def markdown_summary(result: EvalResult) -> str:
    lines = [f"### {result.title}", "", "| metric | " + " | ".join(result.models) + " |", "|---|" + "---|" * len(result.models)]
    for name, per in result.metrics.items():
        info = result.info.get(name)
        cells = []
        for m in result.models:
            e = per.get(m)
            if e is None or e.n == 0:
                cells.append("n/a")
            elif math.isnan(e.low):  # a ratio with no interval (distinct-n) or a single value
                cells.append(f"{e.value:.3f} n={e.n}")
            else:
                cells.append(f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}] n={e.n}")
        lines.append(f"| {info.label if info else name} | " + " | ".join(cells) + " |")
    models = result.compared
    if result.differences and models:
        lines += ["", *_difference_table_lines(result, result.differences, f"difference to {result.baseline}", models),
                  "", difference_legend(result)]
    if result.head_to_head:
        lines += ["", *_difference_table_lines(result, result.head_to_head, "head to head", _columns(result.head_to_head)),
                  "", head_to_head_legend(result)]
    if result.curve_comparisons:
        lines += ["", *curve_comparison_lines(result.curve_comparisons)]
    if result.contrast_agreement:
        lines += ["", "| contrast | pairs | ties | unscored | share agreeing |", "|---|---|---|---|---|"]
        lines += [f"| {r.group} | {r.pairs} | {r.ties} | {r.unscored} | {r.estimate.fmt()} |" for r in result.contrast_agreement]
    return "\n".join(lines)


def _difference_table_lines(result: EvalResult, table: dict[str, dict[str, Estimate]], title: str, columns: list[str]) -> list[str]:
    lines = [f"| {title} (95% paired bootstrap) | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, per in table.items():
        info = result.info.get(name)
        lines.append(f"| {info.label if info else name} | " + " | ".join(format_difference(per.get(c)) for c in columns) + " |")
    return lines


def report_paths(output_dir: Path) -> dict[str, Path]:
    return {"html": output_dir / "report.html", "json": output_dir / "metrics.json", "markdown": output_dir / "summary.md"}


def write_report(result: EvalResult, output_dir: Path) -> dict[str, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = report_paths(output_dir)
    write_text_atomic(paths["html"], render_html(result))
    write_text_atomic(paths["json"], json.dumps(result.to_json(), indent=1))
    write_text_atomic(paths["markdown"], markdown_summary(result) + "\n")
    return paths

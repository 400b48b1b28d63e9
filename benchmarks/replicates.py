"""What a recipe's result looks like across replicates (``prefalign run RECIPE --seed N``).

A report's intervals are over prompts for one draw of the samples and the training order; a
replicate is another draw. This reads the eval folders (or their ``metrics.json``) of several
runs and prints, per run, each model's difference to the base on one metric and each curve
comparison's points (first − second at the first's KL, with its interval), then the totals over
runs: how many points sit at or above, how many have their interval above 0, how many below.

    python benchmarks/replicates.py runs/odpo-sentiment/eval runs/odpo-sentiment-seed1/eval \\
        runs/odpo-sentiment-seed2/eval --metric "sentiment[rtp]"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(path: Path) -> dict:
    """A run's ``metrics.json``, from the file or the eval folder holding it."""
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        sys.exit(f"{path}: no metrics.json (pass an eval stage's folder or its metrics.json)")
    return json.loads(file.read_text())


def interval(value: float, low: float, high: float) -> str:
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def point_sign(point: dict) -> str:
    """'above' / 'below' where the interval excludes 0, 'holds 0' otherwise."""
    if point["difference_low"] > 0:
        return "above"
    if point["difference_high"] < 0:
        return "below"
    return "holds 0"


def comparison_totals(runs: list[dict]) -> dict[str, int]:
    """Counts over every compared point of every run's curve comparisons."""
    totals = {"draws": 0, "compared": 0, "at_or_above": 0, "above": 0, "below": 0, "not_compared": 0}
    for metrics in runs:
        for comparison in metrics.get("curve_comparisons", []):
            totals["draws"] += 1
            compared = [p for p in comparison["points"] if p.get("difference") is not None]
            totals["compared"] += len(compared)
            totals["not_compared"] += len(comparison["points"]) - len(compared)
            totals["at_or_above"] += sum(bool(p["at_or_above"]) for p in compared)
            for p in compared:
                sign = point_sign(p)
                if sign != "holds 0":
                    totals[sign] += 1
    return totals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="eval folders (or metrics.json files), one per replicate")
    parser.add_argument("--metric", help="a metric with differences to the base, e.g. 'sentiment[rtp]' (default: the first)")
    args = parser.parse_args(argv)
    runs = [read_metrics(p) for p in args.runs]
    for path, metrics in zip(args.runs, runs):
        print(f"## {path}")
        differences = metrics.get("differences", {})
        metric = args.metric or next(iter(differences), None)
        if metric is not None:
            if metric not in differences:
                sys.exit(f"{path}: no differences for metric '{metric}' ({', '.join(differences)})")
            base = metrics["metrics"][metric].get(metrics.get("baseline", "base"), {}).get("value")
            print(f"{metric}, difference to the base ({base:.3f}):" if base is not None else f"{metric}, difference to the base:")
            for model, d in differences[metric].items():
                print(f"  {model:<28} {interval(d['value'], d['low'], d['high'])}  n={d['n']}")
        for comparison in metrics.get("curve_comparisons", []):
            print(f"{comparison['first']} − {comparison['second']} at {comparison['first']}'s KL [{comparison['prompt_set']}]: "
                  f"at or above at {comparison['at_or_above']} of {comparison['compared']}")
            for p in comparison["points"]:
                where = f"KL {p['kl']:.1f}"
                if p.get("difference") is None:
                    print(f"  {p['label']:<28} {where}  outside {comparison['second']}'s KL range")
                else:
                    print(f"  {p['label']:<28} {where}  {interval(p['difference'], p['difference_low'], p['difference_high'])}  {point_sign(p)}")
        print()
    totals = comparison_totals(runs)
    if totals["draws"]:
        print(f"over {len(runs)} runs, {totals['draws']} comparisons: {totals['at_or_above']} of {totals['compared']} compared "
              f"points at or above ({totals['above']} with the interval above 0), {totals['below']} with the interval "
              f"below 0; {totals['not_compared']} outside the other curve's KL range")


if __name__ == "__main__":
    main()

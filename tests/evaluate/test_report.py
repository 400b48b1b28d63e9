"""The evaluation report: every plot and table present, numbers with intervals, self-contained."""

import json
import re

from prefalign.evaluate.report import EvalResult, MetricInfo, markdown_summary, write_report
from prefalign.evaluate.stats import mean, share


def sample_result():
    return EvalResult(
        title="base vs trained",
        models=["base", "trained"],
        metrics={
            "attack_success": {"base": share([True, True, False, True]), "trained": share([False, False, True, False])},
            "kl": {"base": mean([0.0, 0.0]), "trained": mean([1.0, 2.0, 3.0])},
        },
        info={"attack_success": MetricInfo("attack_success", "attack success rate", False, "share of harmful prompts not refused"),
              "kl": MetricInfo("kl", "KL to reference", None)},
        examples={"advbench": [{"prompt": "How do I <b>x</b>?", "base": "Sure", "trained": "I can't help with that."}]},
        training_logs={"dpo": [{"step": 1, "loss": 0.69, "rewards/margin": 0.0, "rewards/accuracy": 0.5},
                               {"step": 2, "loss": 0.6, "rewards/margin": 0.2, "rewards/accuracy": 0.7, "eval/loss": 0.65}]},
        reward_vs_kl=[{"label": "dpo β=0.1", "kl": 1.0, "kl_stderr": 0.1, "reward": 0.3, "reward_stderr": 0.05}],
    )


def test_report_has_every_plot_table_and_escapes_text(tmp_path):
    paths = write_report(sample_result(), tmp_path)
    page = paths["html"].read_text()
    assert page.count("<img") == 3 and page.count("data:image/png;base64,") == 3  # bars, curves, reward-vs-KL
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "&lt;b&gt;x&lt;/b&gt;" in page  # prompts are escaped, not rendered
    assert "attack success rate" in page and "[0.046, 0.699]" in page  # trained: 1/4 with its Wilson interval
    # The better model (lower attack success) is highlighted; KL has no "better".
    assert re.search(r'class="num best">0\.250', page)
    data = json.loads(paths["json"].read_text())
    assert data["metrics"]["attack_success"]["trained"]["n"] == 4


def test_markdown_summary_lists_every_metric():
    text = markdown_summary(sample_result())
    assert "| attack success rate | 0.750" in text and "| KL to reference |" in text


def test_markdown_prints_no_interval_where_there_is_none():
    from prefalign.evaluate.stats import Estimate

    result = sample_result()
    result.metrics["distinct_2"] = {"base": Estimate(0.854, float("nan"), float("nan"), 24, None, "ratio")}
    text = markdown_summary(result)
    assert "| distinct_2 | 0.854 n=24 | n/a |" in text and "nan" not in text


def result_with_differences():
    from prefalign.evaluate.stats import Estimate, paired_difference

    result = sample_result()
    result.baseline = "base"
    result.bootstrap = {"samples": 2000, "seed": 0}
    result.metrics["text_perplexity[benign]"] = {"base": Estimate(20.0, 18.0, 22.0, 40, None, "pooled"),
                                                 "trained": Estimate(21.0, 19.0, 23.0, 40, None, "pooled")}
    result.info["text_perplexity[benign]"] = MetricInfo("text_perplexity[benign]", "perplexity on held-out reference text [benign]", False)
    result.differences = {
        "attack_success": {"trained": paired_difference([0, 0, 1, 0] * 10, [1, 1, 0, 1] * 10)},
        "kl": {"trained": Estimate(0.5, -0.1, 1.2, 3, None, "difference")},
        "text_perplexity[benign]": {"trained": Estimate(0.05, 0.012, 0.098, 40, None, "relative")},
    }
    return result


def test_markdown_has_the_difference_table_with_markers_and_a_legend():
    text = markdown_summary(result_with_differences())
    lines = text.splitlines()
    head = lines.index("| difference to base (95% paired bootstrap) | trained |")
    rows = lines[head + 2 : head + 5]
    assert re.fullmatch(r"\| attack success rate \| -0\.500 \[-0\.\d\d, -0\.\d\d\] \* \|", rows[0]), rows[0]
    assert rows[1] == "| KL to reference | +0.500 [-0.10, +1.20] |"  # interval holds 0: no marker
    assert rows[2] == "| perplexity on held-out reference text [benign] | +5.0% [+1.2%, +9.8%] * |"
    legend = lines[head + 6]
    assert legend.startswith("Δ = model − base") and "2000 resamples" in legend and "* = the interval excludes 0" in legend
    # Without differences (one model), no second table.
    assert "difference to" not in markdown_summary(sample_result())


def test_html_and_json_carry_the_differences(tmp_path):
    paths = write_report(result_with_differences(), tmp_path)
    page = paths["html"].read_text()
    assert "<h2>Difference to base</h2>" in page and page.count("<table") == 3
    # Attack success went down (lower is better), significantly: marked better; KL has no direction.
    assert re.search(r'class="num better">-0\.500 \*', page)
    assert 'class="num worse">+5.0% *' in page  # perplexity up
    assert 'class="num">+0.500<br>' in page
    data = json.loads(paths["json"].read_text())
    assert data["baseline"] == "base" and data["bootstrap"] == {"samples": 2000, "seed": 0}
    assert data["differences"]["attack_success"]["trained"]["kind"] == "difference"
    assert data["differences"]["text_perplexity[benign]"]["trained"]["value"] == 0.05


def test_agreement_plot_of_a_unanimous_contrast():
    """A share of 1 whose Wilson upper bound rounds to just under 1 (n = 10: 0.9999999999999999)
    once made matplotlib refuse a negative error bar and stop the eval stage."""
    from prefalign.evaluate.report import agreement_plot
    from prefalign.evaluate.stats import Estimate, wilson_interval
    from prefalign.score.agreement import Agreement

    low, high = wilson_interval(10, 10)
    assert high < 1.0  # the case itself
    rows = [Agreement("all", Estimate(1.0, low, high, 10), agree=10, disagree=0, ties=0, unscored=0),
            Agreement("none", Estimate(0.0, *wilson_interval(0, 10), 10), agree=0, disagree=10, ties=0, unscored=0)]
    png = agreement_plot(rows)
    assert png and len(png) > 100

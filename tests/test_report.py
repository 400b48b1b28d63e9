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

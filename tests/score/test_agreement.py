"""Contrast accuracy: the share of pairs where the scorer prefers what the strategy chose."""

from prefalign.data.records import PreferenceRecord
from prefalign.evaluate.report import EvalResult, markdown_summary, render_html
from prefalign.score.agreement import agreement_table, contrast_agreement


def pair(strategy, chosen, rejected):
    meta = {"strategy": strategy} if strategy else {}
    return PreferenceRecord(prompt="p", chosen="a", rejected="b", reward_chosen=chosen, reward_rejected=rejected, meta=meta)


def records():
    return [
        pair("prefix", 1.0, 0.0), pair("prefix", 0.2, 0.1), pair("prefix", 0.0, 0.5),  # 2 of 3 agree
        pair("demon", 0.3, 0.3),  # a tie: not in the share
        pair("demon", None, 0.2),  # unscored
        pair("demon", -1.0, -2.0),  # agrees
        pair(None, 0.0, 1.0),  # untagged, disagrees
    ]


def test_agreement_per_contrast_by_hand():
    rows = contrast_agreement(records())
    assert list(rows) == ["prefix", "demon", "(untagged)", "all"]
    prefix, demon, untagged, total = rows.values()
    assert (prefix.agree, prefix.disagree, prefix.ties, prefix.unscored) == (2, 1, 0, 0)
    assert abs(prefix.estimate.value - 2 / 3) < 1e-12 and prefix.estimate.n == 3
    # Wilson 95% interval of 2/3 (z=1.96): centre 0.5731, half-width 0.3654
    assert abs(prefix.estimate.low - 0.2077) < 1e-3 and abs(prefix.estimate.high - 0.9385) < 1e-3
    assert (demon.agree, demon.ties, demon.unscored, demon.estimate.n, demon.pairs) == (1, 1, 1, 1, 3)
    assert demon.estimate.value == 1.0
    assert untagged.estimate.value == 0.0
    assert (total.agree, total.disagree, total.ties, total.unscored, total.pairs) == (3, 2, 1, 1, 7)


def test_one_group_has_no_total_and_all_ties_give_no_share():
    rows = contrast_agreement([pair("refine", 0.5, 0.5)])
    assert list(rows) == ["refine"]
    assert rows["refine"].estimate.n == 0 and rows["refine"].ties == 1
    assert "n/a" in agreement_table(rows)


def test_report_shows_the_agreement_table_and_plot():
    result = EvalResult("popalign", ["base"], {}, {}, contrast_agreement=list(contrast_agreement(records()).values()))
    page = render_html(result)
    assert "<h2>Contrast agreement</h2>" in page and page.count("data:image/png;base64,") == 1
    assert "<td>prefix</td><td class='num'>3</td><td class='num'>2</td>" in page
    assert "| prefix | 3 | 0 | 0 | 0.667" in markdown_summary(result)

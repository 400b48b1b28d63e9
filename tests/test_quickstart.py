"""The quickstart (``make demo``) end to end on tiny-random: split, before/after scores, and the
paired difference it prints."""

import pytest

from prefalign.quickstart import run_quickstart


@pytest.mark.slow
def test_quickstart_on_tiny_random_reports_a_paired_difference(tmp_path, tiny_model):
    result = run_quickstart(tmp_path / "qs", model=tiny_model, max_steps=1, show_progress=False)
    assert result.eval_pairs >= 100 and result.train_pairs + result.eval_pairs == 250
    assert len(result.before.wins) == len(result.after.wins) == result.eval_pairs
    assert result.before.share == pytest.approx(sum(result.before.wins) / result.eval_pairs)
    diff = result.difference()
    assert diff.n == result.eval_pairs
    assert diff.value == pytest.approx(result.after.share - result.before.share)
    assert diff.low <= diff.value <= diff.high
    assert result.difference() == diff  # a fixed bootstrap seed: the same interval every time
    # a re-run into the same folder starts a fresh run instead of refusing or mixing logs
    again = run_quickstart(tmp_path / "qs", model=tiny_model, max_steps=1, show_progress=False)
    assert again.after.wins == result.after.wins

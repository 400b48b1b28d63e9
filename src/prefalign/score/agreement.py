"""Contrast accuracy: how often a scorer agrees with the pairs a labelling-free strategy made.

PopAlign (and critique, toxic-control, ...) decide chosen vs rejected by construction, not by a
label. Once the pairs are scored, the share with ``reward_chosen > reward_rejected`` says how often
an external signal agrees with that construction; reported per contrast (``meta.strategy``), it
shows which contrasts carry signal and which are noise. Ties and unscored pairs are counted but
kept out of the share: a tie is neither agreement nor disagreement.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prefalign.data.records import PreferenceRecord
from prefalign.evaluate.stats import Estimate, share

UNTAGGED = "(untagged)"


@dataclass(frozen=True)
class Agreement:
    """One contrast's agreement share (over pairs with two different scores) and its counts."""

    group: str
    estimate: Estimate  # share of decided pairs where the scorer prefers chosen; Wilson 95% interval
    agree: int
    disagree: int
    ties: int
    unscored: int

    @property
    def pairs(self) -> int:
        return self.agree + self.disagree + self.ties + self.unscored

    def as_dict(self) -> dict:
        return {"group": self.group, "agree": self.agree, "disagree": self.disagree, "ties": self.ties,
                "unscored": self.unscored, **{f"share_{k}": v for k, v in self.estimate.as_dict().items()}}


def contrast_agreement(records: Iterable[PreferenceRecord], by: str = "strategy") -> dict[str, Agreement]:
    """Agreement per value of ``meta[by]`` (records without it go to ``"(untagged)"``), in order
    of first appearance, plus ``"all"`` when there is more than one group."""
    verdicts: dict[str, list[bool | None]] = {}
    unscored: dict[str, int] = {}
    for rec in records:
        group = str(rec.meta.get(by) or UNTAGGED)
        verdicts.setdefault(group, [])
        unscored.setdefault(group, 0)
        if rec.reward_chosen is None or rec.reward_rejected is None:
            unscored[group] += 1
        else:
            verdicts[group].append(None if rec.reward_chosen == rec.reward_rejected else rec.reward_chosen > rec.reward_rejected)
    if len(verdicts) > 1:
        verdicts["all"] = [v for group in list(verdicts) for v in verdicts[group]]
        unscored["all"] = sum(unscored.values())
    out = {}
    for group, values in verdicts.items():
        decided = [v for v in values if v is not None]
        out[group] = Agreement(group, share(decided), sum(decided), len(decided) - sum(decided),
                               len(values) - len(decided), unscored[group])
    return out


def agreement_table(rows: dict[str, Agreement]) -> str:
    """A plain-text table for the terminal, under its heading."""
    lines = ["scorer agreement with the pairs' construction (chosen scored higher):", f"{'contrast':<14} {'pairs':>5} {'agree':>5} {'ties':>4} {'unscored':>8}  share agreeing [95% CI]"]
    for row in rows.values():
        lines.append(f"{row.group:<14} {row.pairs:>5} {row.agree:>5} {row.ties:>4} {row.unscored:>8}  {row.estimate.fmt()}")
    return "\n".join(lines)

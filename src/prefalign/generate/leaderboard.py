"""``leaderboard`` (PopAlign leaderboard contrast): the answer of the model ranked higher on a
leaderboard is chosen over the lowest-ranked model's. The ranking is configured (``ranking``,
best first, by model name or id); by default it is the order the models are given."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from prefalign.generate.contrast import ModelContrast
from prefalign.generate.core import StrategyConfig


class LeaderboardConfig(StrategyConfig):
    """Leaderboard contrast."""

    ranking: list[str] | None = Field(
        None, min_length=2, description="the models, best first (names or ids); default: the order given"
    )


class LeaderboardContrast(ModelContrast):
    name: ClassVar[str] = "leaderboard"
    Config = LeaderboardConfig
    description = "PopAlign: stronger model (chosen) vs weaker model (rejected) by a ranking"

    def pick(self) -> tuple[int, int, str]:
        n = len(self.ctx.backends)
        if not self.config.ranking:
            return 0, n - 1, "ranking: the order given"
        order = []
        for name in self.config.ranking:
            i = self.index_of(name)
            if i is None:
                raise ValueError(f"ranking: '{name}' is not one of the models ({', '.join(map(self.name_of, range(n)))})")
            order.append(i)
        if len(set(order)) < 2:
            raise ValueError("ranking: needs at least two different models")
        return order[0], order[-1], f"ranking: {self.config.ranking[0]} > {self.config.ranking[-1]}"

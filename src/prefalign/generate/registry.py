"""Strategy name -> strategy class. A new strategy is one module and one entry here."""

from __future__ import annotations

from prefalign.generate.anchors import AnchorsStrategy
from prefalign.generate.core import Strategy
from prefalign.generate.critique import CritiqueStrategy
from prefalign.generate.demon import DemonContrast
from prefalign.generate.elicitive import ElicitiveContrast
from prefalign.generate.leaderboard import LeaderboardContrast
from prefalign.generate.nparam import NParamContrast
from prefalign.generate.popalign import PopAlign
from prefalign.generate.prefix import PrefixContrast
from prefalign.generate.refine import RefineContrast
from prefalign.generate.sample_pairs import SamplePairs
from prefalign.generate.steer import SteerStrategy
from prefalign.generate.toxic_control import ToxicControl, ToxicSftData

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        CritiqueStrategy,
        PrefixContrast,
        DemonContrast,
        ElicitiveContrast,
        NParamContrast,
        LeaderboardContrast,
        RefineContrast,
        PopAlign,
        ToxicSftData,
        ToxicControl,
        AnchorsStrategy,
        SamplePairs,
        SteerStrategy,
    )
}


def get_strategy(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}") from None

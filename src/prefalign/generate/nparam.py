"""``nparam`` (PopAlign model-size contrast): the bigger model's answer is chosen over the smaller
model's. Sizes come from the config (``sizes: {model: parameters}``), else from the loaded models
(``num_parameters()``), else the order given (first = bigger)."""

from __future__ import annotations

import logging
from typing import ClassVar

from pydantic import Field

from prefalign.generate.contrast import ModelContrast
from prefalign.generate.core import StrategyConfig

log = logging.getLogger("prefalign.generate")


class NParamConfig(StrategyConfig):
    """Model-size contrast."""

    sizes: dict[str, float] | None = Field(
        None, description="parameter counts by model name or id; default: counted, else the order given"
    )


def model_size(backend) -> float | None:
    model = getattr(backend, "model", None)
    counter = getattr(model, "num_parameters", None)
    if callable(counter):
        try:
            return float(counter())
        except Exception:  # noqa: BLE001 - a size is only a hint
            return None
    return None


class NParamContrast(ModelContrast):
    name: ClassVar[str] = "nparam"
    Config = NParamConfig
    description = "PopAlign: bigger model (chosen) vs smaller model (rejected)"

    def pick(self) -> tuple[int, int, str]:
        n = len(self.ctx.backends)
        sizes: list[float | None]
        if self.config.sizes:
            sizes = [None] * n
            for name, size in self.config.sizes.items():
                i = self.index_of(name)
                if i is None:
                    raise ValueError(f"sizes: '{name}' is not one of the models ({', '.join(map(self.name_of, range(n)))})")
                sizes[i] = size
            missing = [self.name_of(i) for i in range(n) if sizes[i] is None]
            if missing:
                raise ValueError(f"sizes: no size for {', '.join(missing)}")
            how = "configured sizes"
        else:
            sizes = [model_size(b) for b in self.ctx.backends]
            how = "counted parameters"
        if any(s is None for s in sizes) or len(set(sizes)) == 1:
            log.info("nparam: sizes unknown or equal (%s); taking the order given, first = bigger", sizes)
            return 0, n - 1, "order given (first = bigger)"
        big = max(range(n), key=lambda i: (sizes[i], -i))
        small = min(range(n), key=lambda i: (sizes[i], i))
        return big, small, f"{how}: {sizes[big]:.4g} vs {sizes[small]:.4g}"

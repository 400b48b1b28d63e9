"""``toxicity``: the 6-label Jigsaw BiLSTM shipped in ``toxic-comment-classifier==0.3.0``.

The package's own code imports TensorFlow; we use only its two data files and rebuild the small
network from its ``model.py`` in plain torch (no Keras, no TensorFlow):

``Embedding(20000, 50)`` -> ``Bidirectional(LSTM(50, return_sequences=True))`` ->
``GlobalMaxPooling1D`` -> ``Dense(50, relu)`` -> ``Dense(6, sigmoid)`` over 100 tokens,
pre-padded and pre-truncated like Keras' ``pad_sequences`` (padding id 0 is not masked, exactly as
in the original). Weights come from ``model/model.weights.h5`` (Keras 3 layout, read with h5py);
the word index comes from ``model/tokenizer.pickle`` (a pickled Keras ``Tokenizer``), read with a
restricted unpickler that only builds plain containers. Keras' LSTM gate order (i, f, c, o) and
sigmoid recurrent activation match ``torch.nn.LSTM``; its single bias goes into ``bias_ih``.
Checked against the package's own Keras model (keras 3.15.1, ``KERAS_BACKEND=torch``,
``load_weights``) on 8 texts: identical token ids, largest probability difference 6e-8;
``tests/score/test_scorers.py`` pins some of those reference probabilities.

Labels: toxic, severe_toxic, obscene, threat, insult, identity_hate. The score is the max over
labels (default), their mean, or one label's probability.
"""

from __future__ import annotations

import collections
import importlib.util
import pickle
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

from .base import Prompt, ScorerConfig, ScorerSpec, ScorerUnavailableError, check_inputs, config_id

PACKAGE = "toxic_classifier"  # import name of toxic-comment-classifier
INSTALL = "pip install --no-deps toxic-comment-classifier==0.3.0 h5py"
LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
MAXLEN = 100
VOCAB_SIZE = 20000
EMBEDDING_DIM = 50
UNITS = 50


class ToxicityConfig(ScorerConfig):
    label: Literal["max", "mean", "toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"] = "max"
    batch_size: int = 64


def package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ScorerUnavailableError(f"the 'toxicity' scorer needs toxic-comment-classifier: {INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    for name in ("model.weights.h5", "tokenizer.pickle"):
        if not (folder / name).is_file():
            raise ScorerUnavailableError(f"{folder / name} is missing; reinstall with: {INSTALL}")
    return folder


class _TokenizerState:
    """Receives the pickled Keras Tokenizer's attributes; nothing of Keras is imported."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("builtins", "int"): int,
        ("builtins", "list"): list,
        ("builtins", "dict"): dict,
    }

    def find_class(self, module: str, name: str):
        if name == "Tokenizer" and module.startswith("keras") and module.endswith("preprocessing.text"):
            return _TokenizerState
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from tokenizer.pickle") from None


class KerasWordTokenizer:
    """Keras' ``Tokenizer.texts_to_sequences`` + ``pad_sequences(maxlen=100)``, reimplemented."""

    def __init__(self, word_index: dict[str, int], num_words: int, filters: str, lower: bool, split: str) -> None:
        self.word_index = {w: i for w, i in word_index.items() if i < num_words}
        self.lower = lower
        self.split = split
        self._table = str.maketrans({c: split for c in filters})

    @classmethod
    def from_pickle(cls, path: Path) -> "KerasWordTokenizer":
        with open(path, "rb") as fh:
            state = _RestrictedUnpickler(fh).load()
        if not isinstance(state, _TokenizerState) or getattr(state, "oov_token", None) is not None:
            raise ScorerUnavailableError(f"{path}: unexpected tokenizer format; reinstall with: {INSTALL}")
        return cls(state.word_index, state.num_words, state.filters, state.lower, state.split)

    def words(self, text: str) -> list[str]:
        if self.lower:
            text = text.lower()
        return [w for w in text.translate(self._table).split(self.split) if w]

    def encode(self, text: str) -> list[int]:
        ids = [i for i in (self.word_index.get(w) for w in self.words(text)) if i is not None]
        ids = ids[-MAXLEN:]  # truncating="pre"
        return [0] * (MAXLEN - len(ids)) + ids  # padding="pre"


def _build_network(weights_path: Path):
    import h5py
    import torch
    from torch import nn

    class BiLSTMClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(VOCAB_SIZE, EMBEDDING_DIM)
            self.lstm = nn.LSTM(EMBEDDING_DIM, UNITS, batch_first=True, bidirectional=True)
            self.dense = nn.Linear(2 * UNITS, 50)
            self.out = nn.Linear(50, len(LABELS))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h, _ = self.lstm(self.embedding(ids))
            pooled = h.max(dim=1).values
            return torch.sigmoid(self.out(torch.relu(self.dense(pooled))))

    net = BiLSTMClassifier()
    t = lambda a: torch.from_numpy(a[()]).float()  # noqa: E731
    with h5py.File(weights_path, "r") as f:
        layers = f["layers"]
        lstm_params = {}
        for direction, suffix in (("forward_layer", ""), ("backward_layer", "_reverse")):
            cell = layers["bidirectional"][direction]["cell"]["vars"]
            lstm_params[f"weight_ih_l0{suffix}"] = t(cell["0"]).T
            lstm_params[f"weight_hh_l0{suffix}"] = t(cell["1"]).T
            lstm_params[f"bias_ih_l0{suffix}"] = t(cell["2"])
            lstm_params[f"bias_hh_l0{suffix}"] = torch.zeros(4 * UNITS)
        state = {
            "embedding.weight": t(layers["embedding"]["vars"]["0"]),
            **{f"lstm.{k}": v for k, v in lstm_params.items()},
            "dense.weight": t(layers["dense"]["vars"]["0"]).T,
            "dense.bias": t(layers["dense"]["vars"]["1"]),
            "out.weight": t(layers["dense_1"]["vars"]["0"]).T,
            "out.bias": t(layers["dense_1"]["vars"]["1"]),
        }
    net.load_state_dict({k: v.contiguous() for k, v in state.items()})
    return net.eval()


@lru_cache(maxsize=1)
def load_classifier() -> tuple[KerasWordTokenizer, object]:
    """The word tokenizer and the torch network (loaded once per process, ~1 s)."""
    folder = package_dir()
    if importlib.util.find_spec("h5py") is None:
        raise ScorerUnavailableError(f"the 'toxicity' scorer reads Keras weights with h5py: {INSTALL}")
    return KerasWordTokenizer.from_pickle(folder / "tokenizer.pickle"), _build_network(folder / "model.weights.h5")


def label_probabilities(texts: Sequence[str]) -> list[dict[str, float]]:
    """All six label probabilities for each text."""
    import torch

    from prefalign.models.threads import fixed_threads

    tokenizer, net = load_classifier()
    if not texts:
        return []
    ids = torch.tensor([tokenizer.encode(t) for t in texts], dtype=torch.long)
    # One thread: this small a network gains a few ms at most from a second one, and when other
    # processes hold the cores every op waits for a descheduled thread (100 texts: 3.4 s on two
    # threads, 0.05 s on one, on the shared 2-core machine).
    with torch.inference_mode(), fixed_threads(1):
        probs = net(ids).tolist()
    return [dict(zip(LABELS, row)) for row in probs]


class ToxicityScorer:
    name = "toxicity"

    def __init__(self, config: ToxicityConfig | None = None) -> None:
        self.config = config or ToxicityConfig()
        self.batch_size = self.config.batch_size
        load_classifier()  # fail (or pay the load) now, before any scoring starts
        self.cache_id = config_id(self.name, self.config, "torch-bilstm/1")

    def score(self, texts: Sequence[str], prompts: Sequence[Prompt] | None = None) -> list[float]:
        check_inputs(texts, prompts)
        label = self.config.label
        out = []
        for probs in label_probabilities(list(texts)):
            values = list(probs.values())
            if label == "max":
                out.append(max(values))
            elif label == "mean":
                out.append(sum(values) / len(values))
            else:
                out.append(probs[label])
        return out



SPEC = ScorerSpec(
    name="toxicity",
    config_cls=ToxicityConfig,
    factory=ToxicityScorer,
    description="Jigsaw 6-label BiLSTM (toxic-comment-classifier): max/mean/one label's probability",
)

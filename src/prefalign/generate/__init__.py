"""Synthesising preference data: ``prefalign generate``.

* :mod:`~prefalign.generate.backends`: models that complete conversations (transformers, OpenAI-compatible, vLLM).
* :mod:`~prefalign.generate.registry`: strategy name -> strategy: ``critique`` (rDPO), PopAlign's ``prefix``,
  ``demon``, ``elicitive``, ``nparam``, ``leaderboard``, ``refine`` and ``popalign``, ``toxic-sft-data`` and
  ``toxic-control`` (ADPO),
  ``anchors`` (D2O), ``sample-pairs`` (ODPO); each in its own module with a typed config.
* :mod:`~prefalign.generate.runner`: runs a strategy over prompts into JSONL, resumably, with progress and a summary.
* :mod:`~prefalign.generate.config` / :mod:`~prefalign.generate.cli`: the YAML config and the command.

Prompt sets are in :mod:`prefalign.data.prompts`.
"""

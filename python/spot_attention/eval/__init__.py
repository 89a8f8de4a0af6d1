"""Evaluation of SpotAttention against dense attention and training-free baselines.

``perplexity`` (perplexity, top-1 agreement, KL), ``baselines`` (oracle top-p, Quest-style,
Twilight-style, streaming), ``passkey`` (retrieval through the chat template), ``harness``
(``run_eval``: every method at several budgets and lengths, attention-mass recall and the
fraction of KV blocks read), ``report`` (JSON, Markdown, PNG).
"""

from .baselines import OracleTopP, QuestTopK, Streaming, TwilightTopP, baseline_methods
from .harness import Document, learned_methods, run_eval
from .passkey import passkey_prompt, run_passkey
from .perplexity import LogitComparison, compare_logits, final_hidden_states

__all__ = [
    "Document",
    "LogitComparison",
    "OracleTopP",
    "QuestTopK",
    "Streaming",
    "TwilightTopP",
    "baseline_methods",
    "compare_logits",
    "final_hidden_states",
    "learned_methods",
    "passkey_prompt",
    "run_eval",
    "run_passkey",
]

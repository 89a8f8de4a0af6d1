"""Perplexity, top-1 next-token agreement and KL(dense || sparse) of output distributions.

The model's last hidden states are kept (``[L, hidden]``, small) rather than logits
(``[L, vocab]``, 1.6 GB at 8K tokens for a 49K vocabulary); logits are rebuilt through the output
head a chunk of positions at a time, for the dense and the sparse run side by side.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack under a ``...ForCausalLM`` (``model.model`` for Llama/Qwen)."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    return inner if isinstance(inner, nn.Module) else model.model


@torch.no_grad()
def final_hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L, hidden] after the final norm, the input of the output head."""
    output = base_model(model)(input_ids=input_ids, use_cache=False)
    return output.last_hidden_state


@dataclasses.dataclass
class LogitComparison:
    """Token-summed statistics of one sparse run against its dense run."""

    tokens: int = 0
    nll_dense: float = 0.0
    nll_sparse: float = 0.0
    agree: int = 0
    kl: float = 0.0

    def add(self, other: "LogitComparison") -> None:
        self.tokens += other.tokens
        self.nll_dense += other.nll_dense
        self.nll_sparse += other.nll_sparse
        self.agree += other.agree
        self.kl += other.kl

    @property
    def ppl_dense(self) -> float:
        return math.exp(self.nll_dense / self.tokens) if self.tokens else float("nan")

    @property
    def ppl_sparse(self) -> float:
        return math.exp(self.nll_sparse / self.tokens) if self.tokens else float("nan")

    @property
    def ppl_delta_pct(self) -> float:
        return 100.0 * (self.ppl_sparse / self.ppl_dense - 1.0)

    @property
    def top1_agree(self) -> float:
        return self.agree / self.tokens if self.tokens else float("nan")

    @property
    def kl_mean(self) -> float:
        return self.kl / self.tokens if self.tokens else float("nan")


@torch.no_grad()
def compare_logits(
    model: nn.Module,
    dense_hidden: torch.Tensor,
    sparse_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    start: int = 0,
    chunk: int = 1024,
) -> LogitComparison:
    """Next-token statistics over positions ``[start, L - 1)`` (each predicts the token after it).

    dense_hidden, sparse_hidden: [B, L, hidden]; input_ids: [B, L]."""
    head = model.get_output_embeddings()
    result = LogitComparison()
    length = input_ids.shape[1]
    for first in range(start, length - 1, chunk):
        last = min(first + chunk, length - 1)
        targets = input_ids[:, first + 1 : last + 1]
        dense_log = torch.log_softmax(head(dense_hidden[:, first:last]).float(), -1)
        sparse_log = torch.log_softmax(head(sparse_hidden[:, first:last]).float(), -1)
        result.tokens += targets.numel()
        result.nll_dense -= float(dense_log.gather(-1, targets[..., None]).sum())
        result.nll_sparse -= float(sparse_log.gather(-1, targets[..., None]).sum())
        result.agree += int((dense_log.argmax(-1) == sparse_log.argmax(-1)).sum())
        result.kl += float((dense_log.exp() * (dense_log - sparse_log)).sum())
    return result

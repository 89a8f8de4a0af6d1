"""Passkey retrieval through the chat template: a five-digit key hidden at a given depth of
filler text, asked for at the end, answered by greedy ``generate()`` (so the sparse run goes
through sparse prefill and sparse decode). Only cases the dense model gets right say anything
about sparsity; the sparse model must keep every one of them."""

from __future__ import annotations

import random
import re

import torch

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
INSTRUCTION = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the pass key.\n\n")
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, passkey: str) -> torch.Tensor:
    """Token ids [1, ~length] of a chat prompt with ``passkey`` at ``depth`` (0 = start, 1 = end)
    of the filler; the assistant turn is opened with ``ANSWER_PREFIX``."""
    needle = f" The pass key is {passkey}. Remember it. {passkey} is the pass key. "

    def render(repeats: int) -> list[int]:
        before = int(round(repeats * depth))
        haystack = FILLER * before + needle + FILLER * (repeats - before)
        messages = [{"role": "user", "content": INSTRUCTION + haystack + QUESTION}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text + ANSWER_PREFIX, add_special_tokens=False)["input_ids"]

    filler_tokens = max(len(tokenizer(FILLER, add_special_tokens=False)["input_ids"]), 1)
    repeats = max(1, (length - len(render(0))) // filler_tokens)
    ids = render(repeats)
    while len(ids) > length and repeats > 1:  # the estimate can overshoot by a few tokens
        repeats -= 1
        ids = render(repeats)
    return torch.tensor([ids], dtype=torch.long)


def _answer(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int) -> str:
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def run_passkey(model, tokenizer, handle, lengths, depths=(0.1, 0.5, 0.9), seed: int = 0,
                max_new_tokens: int = 8, progress=None) -> list[dict]:
    """One row per (length, depth): the key, both answers and whether each is right.

    handle: the ``SpotAttention`` of the attached model (its dense switch gives the dense run)."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    rows = []
    for length in lengths:
        for depth in depths:
            passkey = str(rng.randint(10000, 99999))
            ids = passkey_prompt(tokenizer, length, depth, passkey).to(device)
            with handle.dense():
                dense_answer = _answer(model, tokenizer, ids, max_new_tokens)
            handle.stats.reset()
            sparse_answer = _answer(model, tokenizer, ids, max_new_tokens)
            rows.append({
                "L": int(ids.shape[1]),
                "target_L": length,
                "depth": depth,
                "passkey": passkey,
                "dense_answer": dense_answer.strip(),
                "dense_ok": _found(passkey, dense_answer),
                "sparse_answer": sparse_answer.strip(),
                "sparse_ok": _found(passkey, sparse_answer),
                "frac_read": handle.stats.fraction_read(),
            })
            if progress is not None:
                progress.update(1)
    return rows


def _found(passkey: str, answer: str) -> bool:
    return passkey in re.sub(r"[^0-9]", " ", answer).split() or answer.strip().startswith(passkey)

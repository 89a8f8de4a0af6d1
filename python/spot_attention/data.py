"""Real offline text for distillation, calibration and evaluation: the Python standard library.

The sources of the running Python's standard library (``os.path.dirname(os.__file__)``, without
``site-packages``) are tens of MB of real code and docstrings, in the distribution of code-trained
models, and present wherever Python is. They are split BY FILE, so that no evaluation ever sees a
file used for training:

    bucket = int(sha256(relative posix path).hexdigest()[:8], 16) % 100
    bucket <  80  -> "train"        (selector distillation)
    80 <= b < 90  -> "calibration"  (per-layer top_p)
    bucket >= 90  -> "heldout"      (evaluation)

The rule depends only on the relative path (e.g. ``typing.py``, ``email/_header_value_parser.py``),
so it is the same on every machine with the same Python version. Files are visited in order of
their full hash (a fixed shuffle), and only files of at least ``min_tokens`` tokens are used
("long files only"). Every file handed out is recorded in ``used_files(split)`` and in the
caller's ``used`` list, to be written next to results so that they can be reproduced.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import torch

SPLITS = ("train", "calibration", "heldout")
SPLIT_BOUNDS = {"train": (0, 80), "calibration": (80, 90), "heldout": (90, 100)}
# Code tokenises at roughly 3-4 bytes per token; files shorter than this many bytes per wanted
# token cannot be long enough and are skipped without tokenising them.
MIN_BYTES_PER_TOKEN = 2

_USED: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}


def stdlib_root() -> str:
    return os.path.dirname(os.__file__)


def _hash(relative_path: str) -> str:
    return hashlib.sha256(relative_path.encode("utf-8")).hexdigest()


def split_of(relative_path: str) -> str:
    """The split a file (path relative to the stdlib root, ``/`` separators) belongs to."""
    bucket = int(_hash(relative_path)[:8], 16) % 100
    for split, (low, high) in SPLIT_BOUNDS.items():
        if low <= bucket < high:
            return split
    raise AssertionError(bucket)


def source_files(split: str, root: str | None = None, min_bytes: int = 0) -> list[str]:
    """Relative paths of the split's ``.py`` files of at least ``min_bytes``, in fixed hash order."""
    if split not in SPLITS:
        raise ValueError(f"argument 'split': expected one of {SPLITS}, got {split!r}")
    root = root or stdlib_root()
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__", "dist-packages"))
        for name in names:
            if not name.endswith(".py"):
                continue
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, root).replace(os.sep, "/")
            if split_of(relative) != split:
                continue
            try:
                size = os.path.getsize(full)
            except OSError:
                continue
            if size >= min_bytes:
                found.append(relative)
    return sorted(found, key=_hash)


def documents(
    split: str,
    min_tokens: int,
    tokenizer: Any,
    max_tokens: int | None = None,
    limit: int | None = None,
    used: list | None = None,
    root: str | None = None,
) -> Iterator[torch.Tensor]:
    """Token ids (int64 [n], ``min_tokens <= n``, cut to ``max_tokens``) of the split's long files.

    ``limit`` stops after that many documents; ``used`` (a list) receives one record per document
    handed out: ``{"split", "path", "tokens", "sha256"}`` (path relative to the stdlib root,
    sha256 of the file's bytes), as does ``used_files(split)``.
    """
    root = root or stdlib_root()
    handed_out = 0
    for relative in source_files(split, root, min_bytes=min_tokens * MIN_BYTES_PER_TOKEN):
        if limit is not None and handed_out >= limit:
            return
        with open(os.path.join(root, relative), "rb") as handle:
            raw = handle.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < min_tokens:
            continue
        if max_tokens is not None:
            ids = ids[:max_tokens]
        record = {"split": split, "path": relative, "tokens": len(ids), "sha256": hashlib.sha256(raw).hexdigest()}
        _USED[split].append(record)
        if used is not None:
            used.append(record)
        handed_out += 1
        yield torch.tensor(ids, dtype=torch.long)


def used_files(split: str | None = None) -> list[dict[str, Any]]:
    """Records of every document handed out by ``documents`` in this process."""
    if split is None:
        return [record for name in SPLITS for record in _USED[name]]
    return list(_USED[split])


def training_windows(
    tokenizer: Any,
    length: int,
    count: int,
    seed: int = 0,
    split: str = "train",
    used: list | None = None,
) -> list[torch.Tensor]:
    """``count`` windows of exactly ``length`` tokens from the split's long files, reproducible
    from ``seed``: each file contributes non-overlapping windows at a seeded offset, files taken
    round-robin so that no single file dominates."""
    generator = torch.Generator().manual_seed(seed)
    per_file: list[list[torch.Tensor]] = []
    for ids in documents(split, length, tokenizer, used=used):
        offset = int(torch.randint(0, length, (1,), generator=generator)) if len(ids) >= 2 * length else 0
        usable = (len(ids) - offset) // length
        if usable == 0:
            offset, usable = 0, len(ids) // length
        per_file.append([ids[offset + i * length : offset + (i + 1) * length] for i in range(usable)])
        if sum(len(w) for w in per_file) >= 4 * count:
            break
    windows: list[torch.Tensor] = []
    depth = 0
    while len(windows) < count and any(depth < len(w) for w in per_file):
        for file_windows in per_file:
            if depth < len(file_windows) and len(windows) < count:
                windows.append(file_windows[depth])
        depth += 1
    order = torch.randperm(len(windows), generator=generator).tolist()
    return [windows[i] for i in order]

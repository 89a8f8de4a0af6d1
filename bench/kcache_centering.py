"""What the 4-bit selector K-cache does to the selector's distributions, with keys stored plain,
minus a fitted center (``LayerSelector.fit_key_center``), or turned by a fixed orthonormal
(random-sign Hadamard) rotation applied to queries and keys alike.

    python bench/kcache_centering.py [--tokens 2048] [--rows 512]

Two held-out documents: the center is fitted on the second, everything is measured on the first.
Per format and variant, mean over the shipped selector's layers of the keys' relative L2 error
after the cache's round trip, and of KL(selector distribution from float keys || from 4-bit keys)
over the last ``--rows`` query tokens. Writes bench/results/kcache_centering_<device>.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from benchlib import ROOT, device_tag, import_spot_attention, results_header, write_results


def hadamard_rotation(size: int, seed: int = 12345) -> torch.Tensor:
    """diag(random signs) @ H / sqrt(size) (Sylvester H; size a power of two): orthonormal."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    signs = torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    return signs[:, None] * matrix / math.sqrt(size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import_spot_attention()
    from spot_attention import cli, distill
    from spot_attention.eval import harness
    from spot_attention.integrations.hf import kcache_round_trip
    from spot_attention.selector import load_selectors

    device = torch.device("cpu")
    model, tokenizer = cli.load_model(None, device, torch.float32, print)
    selectors = load_selectors()
    documents = cli.heldout_documents(tokenizer, args.tokens, 2)
    measured = distill.capture_window(model, documents[0].ids[: args.tokens][None], selectors.layers)
    fitting = distill.capture_window(model, documents[1].ids[: args.tokens][None], selectors.layers)
    rotation = hadamard_rotation(selectors.config.selector_dim)
    rows = []
    for fmt in ("int4", "mxfp4", "nvfp4"):
        for variant in ("plain", "centred", "rotated"):
            errors, divergences = [], []
            for layer in selectors.layers:
                selector = selectors[layer]
                query, key, _ = measured[layer]
                with torch.no_grad():
                    keys = selector.key_features(key)
                    queries = selector.query_features(query)[:, :, -args.rows:]
                    center = torch.zeros_like(keys[:, :, :1])
                    if variant == "centred":
                        selector.fit_key_center([fitting[layer][1]])
                        center = selector.key_center[None, :, None].clone()
                        selector.key_center.zero_()
                    if variant == "rotated":
                        keys, queries = keys @ rotation, queries @ rotation
                    cached = kcache_round_trip((keys - center).contiguous(), fmt) + center
                    errors.append(((cached - keys).norm() / keys.norm()).item())
                    scale = selector.softmax_scale
                    exact = (torch.einsum("bhqr,bhkr->bhqk", queries, keys) * scale).log_softmax(-1)
                    quantised = (torch.einsum("bhqr,bhkr->bhqk", queries, cached) * scale).log_softmax(-1)
                    divergences.append((exact.exp() * (exact - quantised)).sum(-1).mean().item())
            rows.append({"format": fmt, "variant": variant, "key_rel_error": sum(errors) / len(errors),
                         "kl": sum(divergences) / len(divergences)})
            print(f"{fmt:6s} {variant:8s} key error {rows[-1]['key_rel_error']:.4f}  KL {rows[-1]['kl']:.4f}",
                  flush=True)
    result = {**results_header(harness.device_description(device), "kcache_centering.py", argv),
              "tokens": args.tokens, "rows_per_layer": args.rows, "documents": [dict(d.info) for d in documents],
              "rows": rows}
    write_results(result, args.out or os.path.join(ROOT, "bench", "results",
                                                   f"kcache_centering_{device_tag(device, 'cpu')}.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

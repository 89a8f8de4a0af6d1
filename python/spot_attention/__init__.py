"""SpotAttention: learned block-sparse attention for frozen long-context LLMs.

Importing the package loads the compiled extension ``spot_ops``, which registers
``torch.ops.spot.*`` (CPU reference kernels always, CUDA kernels where it was built with CUDA).
"""

from . import ops
from .ops import (
    append_kcache,
    block_mass,
    cuda_available,
    decode_select,
    pack_kcache,
    select_blocks,
    selector_score,
    sparse_decode,
    sparse_prefill,
    unpack_kcache,
)

__version__ = "0.1.0"

__all__ = [
    "ops",
    "append_kcache",
    "block_mass",
    "cuda_available",
    "decode_select",
    "pack_kcache",
    "select_blocks",
    "selector_score",
    "sparse_decode",
    "sparse_prefill",
    "unpack_kcache",
]

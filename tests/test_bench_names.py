"""Results-file names of the GPU benchmarks: the GPU model (``decode_h100.json``), whatever the
driver calls the board."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from benchlib import device_tag  # noqa: E402


@pytest.mark.parametrize("name,tag", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100-SXM5-80GB", "h100"),
                                      ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
                                      ("NVIDIA GH200 480GB", "gh200"), ("NVIDIA L40S", "l40s"),
                                      ("NVIDIA GeForce RTX 4090", "nvidia_geforce_rtx_4090")])
def test_device_tag_names_the_gpu_model(name, tag):
    assert device_tag(torch.device("cuda"), name) == tag


def test_device_tag_on_cpu():
    assert device_tag(torch.device("cpu"), "x86_64") == "cpu"

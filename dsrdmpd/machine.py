"""One line that says which machine a measurement came from (for tables and notes)."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: str = "cpu") -> str:
    """E.g. 'Intel(R) Xeon(R) Processor, 2 cores, torch 2.4.1' or 'NVIDIA H100 ..., torch ...'."""
    import torch
    if str(device).startswith("cuda") and torch.cuda.is_available():
        what = torch.cuda.get_device_name(torch.device(device))
    else:
        what = f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return f"{what}, torch {torch.__version__}"


def cpu_has_bf16_kernels() -> bool:
    """Whether PyTorch's oneDNN has bfloat16 convolutions for this CPU (AVX512-BF16, AMX or
    AVX-512 BW/VL/DQ). Without them, bfloat16 autocast on the CPU falls back to PyTorch's
    reference convolution, an order of magnitude slower than float32 (README 'Tests')."""
    import torch
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):     # an older or a stripped build: assume the slow path
        return False

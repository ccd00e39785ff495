import os

import torch

# Kernel benchmarks need the compiled kernels on a GPU. Without one, the CPU benchmarks still import diffusers,
# which imports triton: choose the interpreter first, or that import fails for want of a GPU driver.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

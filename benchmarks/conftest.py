import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # diffusers imports triton; there is no GPU driver on CPU machines

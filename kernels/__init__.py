"""Triton kernels, each with a plain-torch reference. They know nothing of the model."""

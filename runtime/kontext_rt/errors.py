"""The one error hierarchy: every error this package raises on purpose is a KontextError.

Each kind also derives from the builtin a caller would catch without knowing this package (ValueError for bad
input, checkpoints, LoRAs and engines; RuntimeError for a backend that cannot run here), so `except ValueError`
keeps working. The CLI turns a KontextError into one `error:` line and exit status 2; anything else is a bug.
"""

from __future__ import annotations


class KontextError(Exception):
    """Base of every error kontext-rt raises on purpose: the message names the problem and the fix."""


class InputError(KontextError, ValueError):
    """A bad argument or request: a prompt, size, seed, image, option or file the caller gave."""


class CheckpointError(KontextError, ValueError):
    """A checkpoint that is missing, malformed, of the wrong kind, or not safetensors."""


class LoRAError(KontextError, ValueError):
    """A LoRA file that does not fit the model it is loaded into."""


class EngineError(CheckpointError):
    """A missing, stale or unusable TensorRT engine; the message says how to rebuild it."""


class BackendUnavailable(KontextError, RuntimeError):
    """A backend that was asked for explicitly and cannot run here (the message says why and what to use)."""


class PromptTruncated(UserWarning):
    """A warning, not an error: a prompt longer than a text encoder reads; the tokens past its limit are dropped."""


class OutOfMemoryPlan(InputError):
    """A request whose memory plan (kontext_rt.memory) does not fit the device's free memory or max_memory=."""


class OutsideTrainedSize(UserWarning):
    """A run far from the size a checkpoint says it was trained at (model_index.json's _kontext_rt)."""

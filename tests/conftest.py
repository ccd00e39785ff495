import os

# Triton kernels run on the CPU only through the interpreter, which must be chosen before anything imports
# triton (diffusers does, through torch._dynamo).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import builders  # noqa: E402


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def kontext_dir(tmp_path_factory):
    """A tiny FluxKontextPipeline saved with diffusers' save_pretrained: the real diffusers folder layout.

    Its VAE uses 32 norm groups, as FLUX's does, so the same weights also round-trip as a BFL ae.safetensors
    (which records no group count)."""
    return builders.diffusers_checkpoint(
        tmp_path_factory.mktemp("kontext"), guidance=True, vae_channels=[32, 32, 64, 64], vae_groups=32
    )


@pytest.fixture(scope="session")
def schnell_dir(tmp_path_factory):
    return builders.diffusers_checkpoint(tmp_path_factory.mktemp("schnell"), guidance=False)


@pytest.fixture(scope="session")
def bfl_files(tmp_path_factory, kontext_dir):
    """The same weights as kontext_dir as BFL single files (flux1-*.safetensors + ae.safetensors)."""
    return builders.bfl_checkpoint(tmp_path_factory.mktemp("bfl"), kontext_dir)


@pytest.fixture
def lora_file(tmp_path):
    """A PEFT-format LoRA for the tiny checkpoints (tests/test_lora.py's), saved as style.safetensors."""
    from safetensors.torch import save_file

    from tests.test_lora import diffusers_lora

    path = tmp_path / "style.safetensors"
    save_file(diffusers_lora(torch.Generator().manual_seed(10)), str(path))
    return path

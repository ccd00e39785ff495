"""The I/O contract of each exported graph, declared once: names, dtypes, dynamic dims, shape profiles, examples.

The ONNX export, the TensorRT build (optimization profiles) and the manifests all read these; the runtime then
binds exactly these names. Dims are named; a profile gives (min, opt, max) for each named dim.

Transformer graph (the model's forward with the context tokens appended to the target tokens, so one graph serves
editing and text-to-image; only the first N output tokens are the target's velocity):
    img        (batch, img, in_channels)    target tokens then context tokens      model dtype
    txt        (batch, txt, context_in_dim)                                        model dtype
    pooled     (batch, vec_in_dim)                                                 model dtype
    timesteps  (batch,)  sigma; guidance (batch,) only for guidance-distilled models   float32
    cos, sin   (seq, head_dim/2), seq = txt + img: the RoPE tables of the layout   float32
    velocity   (batch, img, in_channels)                                           model dtype
VAE encoder: image (batch, 3, height, width) in [-1, 1] -> latent (batch, z, height/8, width/8), scaled.
VAE decoder: latent -> image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kontext_rt.backends import graph_io as io
from kontext_rt.config import FluxConfig, VAEConfig
from kontext_rt.image import MULTIPLE, PREFERRED_KONTEXT_RESOLUTIONS

Shape = tuple  # of int (static) or str (a named dynamic dim)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: Shape
    dtype: torch.dtype | None  # None: the model's dtype


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: (min, opt, max) per named dim."""

    name: str
    dims: dict[str, tuple[int, int, int]]

    def shapes(self, spec: TensorSpec) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shapes of one input."""
        return tuple(tuple(d if isinstance(d, int) else self.dims[d][i] for d in spec.shape) for i in range(3))

    def to_json(self) -> dict:
        return {"name": self.name, "dims": {k: list(v) for k, v in self.dims.items()}}


@dataclass(frozen=True)
class GraphSpec:
    name: str  # file stem: transformer, vae_encoder, vae_decoder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[Profile, ...]
    example_dims: dict[str, int]  # the sizes traced at export (batch >= 2, so the exporter keeps batch dynamic)

    def example_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else self.example_dims[d] for d in spec.shape)

    def dtype_of(self, spec: TensorSpec, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if spec.dtype is None else spec.dtype

    def to_json(self, model_dtype: torch.dtype) -> dict:
        def io(specs):
            return [
                {"name": s.name, "shape": list(s.shape), "dtype": str(self.dtype_of(s, model_dtype))} for s in specs
            ]

        return {
            "inputs": io(self.inputs),
            "outputs": io(self.outputs),
            "profiles": [p.to_json() for p in self.profiles],
        }


# ---- profiles ----------------------------------------------------------------------------------------------------

MAX_TEXT_TOKENS = 512
# Text-to-image sizes: 256x256 up to 2 megapixels, tuned for 1024x1024 (tokens = pixels / 16^2).
T2I_TOKENS = (256, 4096, 8192)
# Decoded or encoded images: sides from 256 px to the longest preferred Kontext side, tuned for 1024.
IMAGE_SIDE = (256, 1024, 1568)


def kontext_tokens() -> tuple[int, int, int]:
    """Target + one context image, both at a preferred Kontext resolution: (min, 1024x1024, max) tokens."""
    per_image = [(w // MULTIPLE) * (h // MULTIPLE) for w, h in PREFERRED_KONTEXT_RESOLUTIONS]
    return 2 * min(per_image), 2 * (1024 // MULTIPLE) ** 2, 2 * max(per_image)


def _token_profile(name: str, img: tuple[int, int, int], text_tokens: int, max_batch: int) -> Profile:
    txt = (1, text_tokens, MAX_TEXT_TOKENS)
    return Profile(
        name,
        {
            "batch": (1, 1, max_batch),
            "txt": txt,
            "img": img,
            "seq": tuple(t + i for t, i in zip(txt, img, strict=True)),
        },
    )


def transformer_spec(cfg: FluxConfig, text_tokens: int = 512, max_batch: int = 1) -> GraphSpec:
    """text_tokens: the T5 sequence length the engine is tuned for (the variant's max_sequence_length)."""
    f32 = torch.float32
    inputs = [
        TensorSpec(io.IMG, ("batch", "img", cfg.in_channels), None),
        TensorSpec(io.TXT, ("batch", "txt", cfg.context_in_dim), None),
        TensorSpec(io.POOLED, ("batch", cfg.vec_in_dim), None),
        TensorSpec(io.TIMESTEPS, ("batch",), f32),
    ]
    if cfg.guidance_embed:
        inputs.append(TensorSpec(io.GUIDANCE, ("batch",), f32))
    inputs += [TensorSpec(name, ("seq", cfg.head_dim // 2), f32) for name in (io.COS, io.SIN)]
    profiles = (
        _token_profile("kontext", kontext_tokens(), text_tokens, max_batch),
        _token_profile("text-to-image", T2I_TOKENS, text_tokens, max_batch),
    )
    return GraphSpec(
        "transformer",
        tuple(inputs),
        (TensorSpec(io.VELOCITY, ("batch", "img", cfg.in_channels), None),),
        profiles,
        {"batch": 2, "txt": 8, "img": 24, "seq": 32},
    )


def _image_profile(scale: int, max_batch: int) -> Profile:
    side = tuple(s // scale for s in IMAGE_SIDE)
    return Profile("images", {"batch": (1, 1, max_batch), "height": side, "width": side})


def vae_encoder_spec(cfg: VAEConfig, max_batch: int = 1) -> GraphSpec:
    down = cfg.downscale
    return GraphSpec(
        "vae_encoder",
        (TensorSpec(io.IMAGE, ("batch", cfg.in_channels, "height", "width"), None),),
        (TensorSpec(io.LATENT, ("batch", cfg.z_channels, f"height/{down}", f"width/{down}"), None),),
        (_image_profile(1, max_batch),),
        {"batch": 2, "height": 64, "width": 48},
    )


def vae_decoder_spec(cfg: VAEConfig, max_batch: int = 1) -> GraphSpec:
    up = cfg.downscale
    return GraphSpec(
        "vae_decoder",
        (TensorSpec(io.LATENT, ("batch", cfg.z_channels, "height", "width"), None),),
        (TensorSpec(io.IMAGE, ("batch", cfg.in_channels, f"height*{up}", f"width*{up}"), None),),
        (_image_profile(up, max_batch),),
        {"batch": 2, "height": 8, "width": 6},
    )

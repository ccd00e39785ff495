"""The backends that run the runtime's own model (kontext_rt.model): eager with the reference op table, triton with
the Triton kernels' (refused here, before any weights are read, where the kernels cannot build or run)."""

from __future__ import annotations

from dataclasses import replace

import torch

from kontext_rt.backends import attention
from kontext_rt.backends.base import Accepted, Backend, Loaded, LoadRequest
from kontext_rt.backends.prepare import lora_path, prepare
from kontext_rt.errors import BackendUnavailable, InputError
from kontext_rt.model.op_table import EAGER_OPS, Ops
from kontext_rt.model.ulysses import SequenceParallel
from kontext_rt.sampling import denoisers
from kontext_rt.transformer_placement import place_transformer
from kontext_rt.vae_runner import StagedVAE


class TorchBackend(Backend):
    """The runtime's own model, run with this backend's op table."""

    ops: Ops = EAGER_OPS

    def check(self, req: LoadRequest) -> Accepted:
        """Engines, head dims, the attention (probed here, handed to load in the Accepted), every LoRA file (read
        against the model built on the meta device: no weights) and the static FP8 calibration (read here too)."""
        from kontext_rt.model import fp8_linear as fp8
        from kontext_rt.model.transformer import FluxTransformer
        from kontext_rt.weights import lora

        for given, what in ((req.engines, "engines="), (req.engine_precision, "engine_precision=")):
            if given is not None:
                raise InputError(f"{what} is only used by backend='tensorrt', not {self.name!r}")
        if self.ops.head_dims is not None and req.cfg.head_dim not in self.ops.head_dims:
            raise BackendUnavailable(
                f"backend {self.name!r} supports head dims {self.ops.head_dims}, this model "
                f"has {req.cfg.head_dim}; use backend='eager'"
            )
        chosen_attention = self.attention_for(req)
        if req.loras:
            with torch.device("meta"):
                shape_only = FluxTransformer(req.cfg)
            for item in req.loras:
                lora.read(lora_path(item), shape_only)
        amax = None
        if req.optimize.fp8 is fp8.Fp8Mode.STATIC:
            amax = fp8.read_calibration(req.optimize.fp8_calibration, req.checkpoint.fingerprint())
        return Accepted(self, req, amax, chosen_attention)

    def attention_for(self, req: LoadRequest) -> attention.AttentionChoice | None:
        """The attention this backend's op table runs for the request (None: its own); refuses what it cannot."""
        attention.refuse_fa3(req.optimize, self.name)
        return None

    def op_table(self, accepted: Accepted) -> Ops:
        """This backend's ops, with the attention its check chose."""
        if accepted.attention is None:
            return self.ops
        return replace(self.ops, attention=accepted.attention.op(self.ops.attention))

    def load(self, accepted: Accepted) -> Loaded:
        """The transformer is read into host memory when any of it will live there (placement) or be quantized
        (fp8): the device never holds a full-precision copy of what it does not keep."""
        req = accepted.request
        placement, opt = req.placement, req.optimize
        streamed = placement.offloads_blocks or placement.modulation == "staged"
        host = torch.device("cpu")
        transformer = req.checkpoint.load_transformer(req.dtype, host if streamed or opt.fp8 else self.device)
        staged_vae = placement.vae == "staged"
        vae = req.checkpoint.load_vae(req.dtype, host if staged_vae else self.device)
        # FP8 weights are quantized on the device one linear at a time; blocks streamed from host memory go back
        # there as soon as their linears are quantized: the device never holds more than one block of them
        ops = self.op_table(accepted)
        stack = prepare(
            transformer, ops, req, self.device, accepted.input_amax, host if placement.offloads_blocks else None
        )
        residency = place_transformer(transformer, placement, self.device)
        # sequence parallel: the denoisers run the same loop over the model with its image tokens sharded
        model = transformer if req.parallel is None else SequenceParallel(transformer, req.parallel.group)
        denoiser = denoisers.for_model(model, ops, req.dtype, opt.hoist, opt.cuda_graphs, max_graphs=opt.max_graphs)
        if residency is not None:
            denoiser = residency.denoiser(denoiser)
        return Loaded(denoiser, StagedVAE(vae, self.device) if staged_vae else vae, transformer, stack)


def triton_ops(kernels) -> Ops:
    """The triton backend's op table from the kernels module (kontext_rt.kernels.ops), checked or not: the backend
    builds it after its device checks, benchmarks/gpu/op_traffic.py to count it on meta tensors."""
    return Ops(
        attention=kernels.attention_sdpa,
        modulate=kernels.modulate,
        gated_residual=kernels.gated_residual,
        row_linear=kernels.row_linear_op,
        quantize_rows=kernels.quantize_rows,
        gelu_quantize_rows=kernels.gelu_quantize_rows,
        head_dims=kernels.HEAD_DIMS,
    )


class Eager(TorchBackend):
    name = "eager"


class Triton(TorchBackend):
    name = "triton"

    def __init__(self, device: torch.device):
        super().__init__(device)
        try:
            from kontext_rt.kernels import ops as kernels
        except ImportError as err:
            raise BackendUnavailable(
                f"backend 'triton' needs the triton package ({err}); install triton or use backend='eager'"
            ) from err
        if device.type == "cuda":
            if kernels.interpreted():
                raise BackendUnavailable(
                    "backend 'triton' was asked for on a CUDA device, but its kernels were "
                    "compiled for the Triton interpreter (TRITON_INTERPRET=1): unset it, or use "
                    "backend='eager'"
                )
            if not torch.cuda.is_available():
                raise BackendUnavailable("backend 'triton' needs a CUDA GPU and none is visible; use backend='eager'")
            if torch.cuda.get_device_capability(device) < (8, 0):
                name = torch.cuda.get_device_name(device)
                raise BackendUnavailable(
                    f"backend 'triton' needs compute capability 8.0 or newer (bf16), {name} "
                    f"has {torch.cuda.get_device_capability(device)}; use backend='eager'"
                )
            launches(kernels, device)
        elif device.type == "cpu":
            if not kernels.interpreted():
                raise BackendUnavailable(
                    "backend 'triton' needs a CUDA GPU; on the CPU its kernels run only under "
                    "the Triton interpreter (TRITON_INTERPRET=1, for tests); use "
                    "backend='eager'"
                )
        else:
            raise BackendUnavailable(f"backend 'triton' runs on CUDA devices, not {device.type}; use backend='eager'")
        self.ops = triton_ops(kernels)

    def attention_for(self, req: LoadRequest) -> attention.AttentionChoice:
        """sdpa, or FA3 after the pre-pass where it was asked for (or auto prefers it) and the probe passes: an
        explicit request that cannot run is an InputError with the probe's reason."""
        return attention.choose(req.optimize.attention, self.device, req.cfg.head_dim, req.dtype)


def launches(kernels, device: torch.device) -> None:
    """Compile and run one small kernel, so that a machine where Triton cannot build its launcher (no C compiler,
    no writable cache folder) is refused here, before any weights are read, not at the first denoising step."""
    try:
        x = torch.zeros(1, 1, 16, device=device)
        kernels.gated_residual(x, x, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # whatever Triton's toolchain raises: the reason is the message
        raise BackendUnavailable(
            f"backend 'triton' could not compile and run a kernel here ({type(err).__name__}: {err}); "
            "use backend='eager'"
        ) from err

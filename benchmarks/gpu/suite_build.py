"""The phases of the GPU suite (gpu_suite.py) that build what its rungs run on: the matmul rates, the op tables and
graph capture, the FlashAttention-3 probe, the random model, and the model's conversions in place (FP8 linears,
torchao's float8 linears, torch.compile of each block).

BuildPhases is a part of gpu_suite.Suite (its base class): its methods read and set the Suite's fields (args,
device, cfg, layouts, result, ops, model, ...), one method per phase, as gpu_suite's core(), torchao_part() and
compile_part() run them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the suite's parts and the rungs, by plain name
import suite_parts as parts  # noqa: E402
from rungs import BY_NAME  # noqa: E402

HOISTED = BY_NAME["hoisted"]  # the FP8 drift's bf16 reference trace runs hoisted


class BuildPhases:
    """The setup and conversion phases of gpu_suite.Suite."""

    def setup(self):
        """The matmul rates (the MFU denominators), the FP8 matmul, the eager op table, the VAE (core part)."""
        from kontext_rt.backends import resolve
        from kontext_rt.config import VAE_PRESETS
        from kontext_rt.model.fp8_linear import matmul_for
        from kontext_rt.model.vae import AutoEncoder

        n = 256 if self.args.rehearse else 8192
        self.result["matmul_tflops"] = {
            "bf16": parts.matmul_tflops(self.device, False, n),
            "fp8": parts.matmul_tflops(self.device, True, n),
        }
        self.fp8_matmul = matmul_for(self.device)
        self.result["fp8_matmul"] = (
            "torch._scaled_mm (row-wise scales)"
            if self.fp8_matmul is torch._scaled_mm
            else "stand-in: this torch's CPU _scaled_mm takes per-tensor scales only"
        )
        self.ops["eager"] = resolve("eager", self.device).ops
        if self.args.part == "core":
            vae = AutoEncoder(VAE_PRESETS["tiny" if self.args.rehearse else "flux"])
            self.vae = vae.to(self.device, self.dtype).eval().requires_grad_(False)

    def triton_backend(self):
        """The triton op table and graph capture (the interpreter and an eager stand-in in the rehearsal)."""
        from kontext_rt.backends import resolve
        from kontext_rt.sampling.graphs import capture_cuda, capture_eager

        self.ops["triton"] = resolve("triton", self.device).ops
        self.capture = capture_eager if self.args.rehearse else capture_cuda
        self.result["graph_capture"] = "eager stand-in (CPU rehearsal)" if self.args.rehearse else "CUDA graphs"

    def fa3_probe(self):
        """FlashAttention-3 first: import the module, run one tiny forward of each kind (bf16, FP8) on the device
        against SDPA (backends.attention.probe: capability, import, forward within the bound of its roundings),
        and record why when it cannot. The rehearsal probes attention.EmulatedFa3 on the CPU instead (a stand-in:
        the tiny model's head dim is not FA3's 128, and the CPU has no FA3)."""
        from kontext_rt.backends import attention as att
        from kontext_rt.kernels import reference
        from kontext_rt.options import Attention

        found, failed = {}, []
        for kind in (Attention.FA3, Attention.FA3_FP8):
            try:
                if self.args.rehearse:
                    att.forward_agrees(att.EmulatedFa3, torch.device("cpu"), kind is Attention.FA3_FP8, self.dtype)
                    choice = att.AttentionChoice(kind, att.EmulatedFa3, reference.attention_prepass)
                else:
                    choice = att.AttentionChoice(kind, *att.probe(kind, torch.device(self.device), 128, self.dtype))
            except att.Fa3Unavailable as err:
                found[kind.value] = {"ok": False, "reason": str(err)[:1000]}
                failed.append(f"{kind.value}: {err}")
                continue
            self.attention[kind] = choice
            module = choice.module
            found[kind.value] = {
                "ok": True,
                "module": getattr(module, "__name__", type(module).__name__),
                "file": getattr(module, "__file__", None),
                "prepass": f"{choice.prepass.__module__}.{choice.prepass.__name__}",
                **({"stand_in": "EmulatedFa3 on the CPU (rehearsal)"} if self.args.rehearse else {}),
            }
        self.result["fa3"] = found
        if failed:
            raise RuntimeError("FA3 cannot run here, its rungs are skipped: " + "; ".join(failed))

    def build_model(self):
        self.model = parts.random_transformer(self.cfg, self.device, self.dtype)
        self.data = {k: parts.inputs(self.cfg, lay, self.device, self.dtype) for k, lay in self.layouts.items()}

    def fp8_convert(self, keep_reference: bool):
        """The blocks' linears to FP8, in place; first an 8-step bf16 trace for the drift (core part only)."""
        from kontext_rt.model.fp8_linear import convert

        self.denoisers.clear()  # the bf16 graphs read the bf16 weights: they must never replay again
        parts.free_memory(self.device)
        if keep_reference:
            self.reference = parts.trace(self.denoiser(HOISTED), self.data["kontext"], self.steps["drift"])
            self.denoisers.clear()
        convert(self.model, self.ops["triton"].quantize_rows, matmul=self.fp8_matmul)

    def torchao_convert(self):
        """The blocks' FP8-eligible linears (the ones the runtime's fp8 rung converts) quantized in place by torchao:
        float8 dynamic activations and weights with row-wise scales, flux-fast's setting. On the CPU rehearsal
        torchao refuses FP8 below compute capability 8.9; its hardware check is bypassed there (recorded), so the
        rest of its path runs."""
        import torchao
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        from kontext_rt.model.fp8_linear import fp8_eligible

        info = {"torchao": torchao.__version__, "config": "Float8DynamicActivationFloat8WeightConfig(PerRow())"}
        if self.args.rehearse:
            import torchao.quantization.quant_api as quant_api

            quant_api._check_hardware_support = lambda granularity: None
            info["rehearsal"] = "torchao's FP8 hardware check bypassed on the CPU"
        names = []

        def eligible(module, name):
            chosen = isinstance(module, torch.nn.Linear) and fp8_eligible(name)
            names.extend([name] * chosen)
            return chosen

        quantize_(self.model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=eligible)
        self.result["torchao"] = info | {"linears": len(names)}
        self.denoisers.clear()

    def compile_blocks(self):
        backend = self.args.compile_backend
        for block in (*self.model.double_blocks, *self.model.single_blocks):
            block.compile(backend=backend, fullgraph=True, dynamic=False)
        self.result["compile_backend"] = backend

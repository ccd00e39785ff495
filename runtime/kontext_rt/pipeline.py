"""The public API: Pipeline (edit, generate, session) over the runtime's model, VAE and text encoders."""

from __future__ import annotations

import secrets
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from kontext_rt import image as im
from kontext_rt.arguments import check as check_arguments
from kontext_rt.arguments import check_guidance, check_seed, check_solver, check_step_cache
from kontext_rt.backends import Loaded
from kontext_rt.concurrency import ReadWriteLock
from kontext_rt.config import FluxConfig, Variant
from kontext_rt.context_cache import ContextCache
from kontext_rt.errors import InputError, OutsideTrainedSize
from kontext_rt.load_spec import CheckedLoad, LoadSpec
from kontext_rt.model.rope import rope_table, sequence_ids
from kontext_rt.model.vae_tiling import DEFAULT_TILE
from kontext_rt.options import Optimizations
from kontext_rt.parallel import Parallel
from kontext_rt.placement import Placement
from kontext_rt.requests import CheckedRequest, PhaseTimer, Request, RunPlan, RunReport, check_progress, check_prompt
from kontext_rt.sampling.loop import Conditioning, denoise
from kontext_rt.sampling.schedule import explicit_schedule, schedule
from kontext_rt.sampling.step_cache import FirstBlockCache, cacheable
from kontext_rt.text import TextEmbeddingCache, TextEncoders
from kontext_rt.vae_runner import VAERunner

OUTPUTS = ("pil", "latent")
LATENT_CHANNELS = 16


class Pipeline:
    def __init__(
        self,
        loaded: Loaded,
        cfg: FluxConfig,
        text: TextEncoders,
        variant: Variant,
        device,
        dtype,
        backend: str,
        max_sequence_length: int,
        text_cache: TextEmbeddingCache,
        optimize: Optimizations | None = None,
        placement: Placement | None = None,
        vae_tiling: bool | str = "auto",
        vae_tile: int = DEFAULT_TILE,
        trained_sizes: tuple[tuple[int, int], ...] | None = None,
        context_cache_size: int = 16,
        parallel: Parallel | None = None,
    ):
        self.cfg = cfg
        self.parallel = parallel  # sequence parallelism (its process group resolved), or None
        self._one_at_a_time = threading.Lock()  # under parallel: one call issuing collectives at a time
        self.denoiser, self.transformer = loaded.denoiser, loaded.transformer
        engines = self.transformer is None
        self._vae_runner = VAERunner(loaded.vae, device, dtype, vae_tiling, vae_tile, engines)  # holds pipe.vae
        self._loras = loaded.loras  # None: the backend's weights take no LoRAs (engines)
        self.text, self.variant, self.device, self.dtype = text, variant, device, dtype
        self.backend = backend  # the resolved backend's name
        self.max_sequence_length = max_sequence_length
        self.text_cache = text_cache
        self.optimize = optimize or Optimizations()
        self.placement = placement or Placement()
        self.vae_tiling, self.vae_tile = vae_tiling, vae_tile
        self._weights = ReadWriteLock()  # runs read the weights together; a LoRA change waits for them, alone
        self.trained_sizes = trained_sizes  # the sizes the checkpoint says it was trained at; None: FLUX.1's
        self.context_cache = ContextCache(context_cache_size)  # context tokens by the image's content

    @property
    def resolutions(self) -> tuple[tuple[int, int], ...]:
        """What auto_resize snaps context images to: the checkpoint's trained sizes, else Kontext's preferred ones."""
        return tuple(self.trained_sizes or im.PREFERRED_KONTEXT_RESOLUTIONS)

    @property
    def default_size(self) -> tuple[int, int]:
        """What generate makes without a size: the resolution nearest to square (1024x1024 for FLUX.1)."""
        return im.default_size(self.resolutions)

    @classmethod
    def from_pretrained(
        cls,
        path,
        device="cpu",
        dtype=torch.float32,
        backend="auto",
        max_sequence_length=None,
        ae=None,
        text_encoders=None,
        text_cache_dir=None,
        text_cache_size=64,
        engines=None,
        engine_precision=None,
        optimize: Optimizations | None = None,
        loras=(),
        variant: str | None = None,
        max_memory: int | None = None,
        plan_size: tuple[int, int] = (1024, 1024),
        placement: Placement | str | None = None,
        vae_tiling: bool | str = "auto",
        vae_tile: int = DEFAULT_TILE,
        context_cache_size: int = 16,
        parallel: int | Parallel | None = None,
    ) -> Pipeline:
        """Load a diffusers folder or a BFL single file (with ae.safetensors and a text-encoder folder).

        backend: "auto" (triton on a CUDA GPU where it can run, else eager; the engines when given `engines`),
        "eager", "triton" or "tensorrt". backend="tensorrt" runs the engines in `engines` (a folder made by
        `kontext-rt export --out`; with several precisions there, engine_precision picks one) and reads no
        transformer or VAE weights at all.
        optimize: speed options (Optimizations: hoisting, CUDA graphs, FP8 linears, compile). loras: LoRA files,
        each a path or (path, strength), fused before FP8 quantization (the only way to use LoRAs with fp8).
        variant: a name in config.VARIANTS. A diffusers folder says its own (a contradicting one is refused); a BFL
        file of FLUX.1 [dev] shapes is either flux-kontext-dev or flux-dev, so it needs variant= (refused without,
        before any weights are read); schnell shows in its shapes. The file name is never read.
        max_memory: bytes the load and a run at plan_size (with one context image of that size) may take; on CUDA
        without it, the device's free memory. A memory plan over it (kontext_rt.memory) is refused before the weights.
        placement: where each part lives (kontext_rt.placement.Placement, a preset name such as "lean" or "offload",
        or "part=mode,..."); None keeps everything on the device.
        vae_tiling: encode and decode images larger than vae_tile px in overlapping tiles (model/vae_tiling.py):
        True always, False never, "auto" when the untiled call would not fit in the CUDA device's free memory.
        context_cache_size: context images' latent tokens kept by content (kontext_rt.context_cache), so an image
        edited with many prompts is encoded once; 0: off.
        parallel: Ulysses sequence parallelism (docs/python-api.md): N ranks of an initialized torch.distributed
        process group (world size N, or kontext_rt.parallel.Parallel(N, group)), each holding 1/N of the image
        tokens; every rank calls the same methods with the same arguments and gets the same outputs.
        Every argument is checked before any weights are read; then the backend builds what it runs.
        """
        return cls.load(LoadSpec(**{k: v for k, v in locals().items() if k != "cls"}))  # every argument, by name

    @classmethod
    def load(cls, spec: LoadSpec | CheckedLoad) -> Pipeline:
        """Load what a LoadSpec names (checked first, reading no weights), or a CheckedLoad (checked already)."""
        if isinstance(spec, LoadSpec):
            spec = spec.check()
        elif not isinstance(spec, CheckedLoad):
            raise InputError(f"Pipeline.load takes a LoadSpec or a CheckedLoad, got {type(spec).__name__}")
        s = spec.spec
        cache = TextEmbeddingCache(s.text_cache_size, Path(s.text_cache_dir) if s.text_cache_dir else None)
        # refuses unusable tokenizers before the weights
        text = TextEncoders(spec.checkpoint.text_encoders, spec.device, s.dtype, spec.placement.text_encoders)
        loaded = spec.backend.load(spec.accepted)
        return cls(
            loaded,
            spec.cfg,
            text,
            spec.variant,
            spec.device,
            s.dtype,
            spec.backend.name,
            spec.max_sequence_length,
            cache,
            spec.optimize,
            spec.placement,
            s.vae_tiling,
            s.vae_tile,
            spec.trained_sizes,
            s.context_cache_size,
            spec.parallel,
        )

    # ---- public entry points ----------------------------------------------------------------------------------

    def edit(
        self,
        image,
        prompt: str,
        steps=None,
        guidance=None,
        seed=None,
        width=None,
        height=None,
        auto_resize=True,
        latents=None,
        output="pil",
        sigmas=None,
        progress=None,
        report=None,
        solver="euler",
        step_cache=None,
        reuse_latents=False,
    ):
        """Edit one or several context images (a list: image i gets RoPE ids (i, r, c)) from an instruction.

        Every argument is checked (the images read and sized, the schedule and noise made) before any encoding.
        solver: "euler" (the default) or "dpm++2m" (sampling/solvers.py), one model call per step either way.
        step_cache: a threshold for the first-block residual cache (lossy; sampling/step_cache.py), None or 0: off.
        reuse_latents: keep this edit's output latents, and take a context image that is such an output (the same
        pixels, at the size it was made) from them in place of encoding it (kontext_rt.context_cache; sessions)."""
        images = image if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise InputError("edit needs at least one context image")
        request = Request(
            prompt,
            tuple(images),
            width,
            height,
            steps,
            guidance,
            seed,
            auto_resize,
            solver,
            sigmas,
            step_cache,
            reuse_latents,
        )
        checked = self._check(request, latents, output, progress)
        return self._execute([checked], progress, [report])[0]

    def generate(
        self,
        prompt: str,
        width=None,
        height=None,
        steps=None,
        guidance=None,
        seed=None,
        latents=None,
        output="pil",
        sigmas=None,
        progress=None,
        report=None,
        solver="euler",
        step_cache=None,
    ):
        """Text-to-image: the same sampler with no context tokens. width, height: default_size's (1024x1024, or the
        size a checkpoint says it was trained at). solver, step_cache: as edit's."""
        request = Request(
            prompt, (), width, height, steps, guidance, seed, solver=solver, sigmas=sigmas, step_cache=step_cache
        )
        return self._execute([self._check(request, latents, output, progress)], progress, [report])[0]

    def session(self, image, **defaults) -> EditSession:
        """Multi-turn editing: each turn's output becomes the next turn's context image. defaults: edit's keyword
        arguments for every turn; reuse_latents=True hands each turn's latents to the next (no decode-encode)."""
        return EditSession(self, image, **defaults)

    def check(self, request: Request) -> CheckedRequest:
        """Check a request once, before any encoding (InputError naming the problem): every argument, its images read
        and sized, its noise drawn and schedule made. run_checked runs what this returns; its key says which
        checked requests can share one batch."""
        if not isinstance(request, Request):
            raise InputError(f"check takes a kontext_rt.Request, got {type(request).__name__}")
        return self._check(request)

    def batch_key(self, request: Request) -> tuple:
        """Requests with equal keys can run as one batch (run_batch): the same output size, step count and context
        image sizes, solver and schedule. Checks the request (InputError) and reads its images; nothing is encoded."""
        return self.check(request).key

    def run_batch(self, requests: list[Request], reports: list[RunReport] | None = None, progress=None) -> list:
        """Run requests of one batch key through one sampling loop, each with its own prompt, seed, guidance and
        context images; returns their images in order. Each image equals the same request run alone (edit or
        generate): the noise is drawn per request, the VAE and the text encoders run per request, and the
        modulation table is computed row by row; only the transformer's steps are shared, and its rows are
        computed independently of one another. Every request is checked before any encoding."""
        if not isinstance(requests, (list, tuple)) or not requests:
            raise InputError("run_batch needs a non-empty list of Request")
        if any(not isinstance(r, Request) for r in requests):
            raise InputError("run_batch takes kontext_rt.pipeline.Request objects")
        check_progress(progress)
        return self.run_checked([self._check(r) for r in requests], reports, progress)

    def run_checked(self, checked: list[CheckedRequest], reports: list[RunReport] | None = None, progress=None) -> list:
        """Run requests checked by check (one batch key) through one sampling loop: run_batch without the checks,
        for a caller (the server) that checked each request when it arrived. Returns their outputs in order."""
        if not isinstance(checked, (list, tuple)) or not checked:
            raise InputError("run_checked needs a non-empty list of checked requests (Pipeline.check)")
        if any(not isinstance(c, CheckedRequest) or c.owner is not self for c in checked):
            raise InputError("run_checked takes what this pipeline's check returned")
        if len({c.key for c in checked}) > 1:
            raise InputError(
                "run_batch: the requests differ in output size, steps, context sizes, solver or sigmas (batch_key)"
            )
        if reports is not None and (
            not isinstance(reports, (list, tuple))
            or len(reports) != len(checked)
            or any(not isinstance(r, RunReport) for r in reports)
        ):
            raise InputError(f"reports must be a list of one RunReport per request ({len(checked)}), got {reports!r}")
        check_progress(progress)
        return self._execute(list(checked), progress, list(reports or [None] * len(checked)))

    def load_lora(self, path, strength: float = 1.0, name: str | None = None) -> str:
        """Fuse a LoRA file into the transformer's weights (W += strength * alpha/r * B @ A); returns its name.

        Several may be loaded; unload_lora restores the exact original weights.
        """
        self._lora_stack("load_lora")
        with self._weights.writing():
            name = self._loras.load(path, strength, name)
            self.denoiser.weights_changed()
        return name

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA by name, or all of them: the weights become bit for bit what they were without it."""
        self._lora_stack("unload_lora")
        with self._weights.writing():
            self._loras.unload(name)
            self.denoiser.weights_changed()

    @property
    def vae(self):
        """The autoencoder (or its engines) the pipeline runs, staged and tiled as its options say."""
        return self._vae_runner.vae

    @vae.setter
    def vae(self, vae) -> None:
        with self._weights.writing():  # after the runs that read the old VAE, whose encodes could refill the cache
            self._vae_runner.vae = vae
            self.context_cache.clear()  # another VAE encodes otherwise

    @property
    def loras(self) -> list[str]:
        return [] if self._loras is None else self._loras.names()

    def _lora_stack(self, what: str):
        if self._loras is None:
            raise InputError(
                f"{what}: backend {self.backend!r} runs engines, which take no LoRAs: fuse a LoRA into "
                "the checkpoint's weights before exporting it, or use the eager or triton backend"
            )
        if self.optimize.fp8 is not None:
            raise InputError(
                f"{what}: the FP8 weights were quantized at load; pass loras=[...] to from_pretrained "
                "to fuse LoRAs before quantization"
            )

    # ---- internals --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _encode_context(self, pil, size: tuple[int, int]) -> torch.Tensor:
        x = im.to_tensor(pil, *size).to(self.device, self.dtype)
        return im.pack(self._vae_runner.encode(x, *size))

    def encode_prompt(self, prompt: str, report: RunReport | None = None):
        """(txt, pooled) for a prompt, from the cache when possible."""
        check_prompt(prompt)
        self.text.warn_if_truncated(prompt, self.max_sequence_length)
        key = TextEmbeddingCache.key(prompt, self.max_sequence_length, self.text.identity)
        hit = self.text_cache.get(key)
        if report is not None:
            report.text_cache_hit = hit is not None
        if hit is None:
            hit = self.text.encode(prompt, self.max_sequence_length)
            self.text_cache.put(key, hit, prompt)
        return tuple(t.to(self.device, self.dtype) for t in hit)

    def _check(self, r: Request, latents=None, output="pil", progress=None) -> CheckedRequest:
        """The one check of a request (edit, generate, run_batch and the server's): its arguments, its images read
        and sized, its noise drawn (on the CPU) and its schedule made; nothing encoded."""
        check_prompt(r.prompt)
        check_arguments(r.width, r.height, r.steps, r.guidance, r.seed)
        check_progress(progress)
        check_solver(r.solver)
        check_step_cache(r.step_cache)
        if r.step_cache:
            cacheable(self.denoiser)  # refused here, before any work, where the denoiser cannot skip blocks
        if not isinstance(r.auto_resize, bool):
            raise InputError(f"auto_resize must be True or False, got {r.auto_resize!r}")
        if not isinstance(r.reuse_latents, bool):
            raise InputError(f"reuse_latents must be True or False, got {r.reuse_latents!r}")
        if r.images is None:
            raise InputError("Request.images must be a tuple of context images (paths or PIL images), or empty")
        images = list(r.images) if isinstance(r.images, (list, tuple)) else [r.images]
        pils = [im.load_image(img) for img in images]
        sizes = [im.context_size(*pil.size, r.auto_resize, preferred=self.resolutions) for pil in pils]
        if pils:
            width, height = r.width or sizes[0][0], r.height or sizes[0][1]
            guidance = self.variant.edit_guidance if r.guidance is None else r.guidance
        else:
            width, height = r.width or self.default_size[0], r.height or self.default_size[1]
            guidance = self.variant.generate_guidance if r.guidance is None else r.guidance
        im.check_output_size(width, height)
        far = im.outside_trained_size(width, height, self.trained_sizes) if self.trained_sizes else None
        if far:
            warnings.warn(OutsideTrainedSize(far), stacklevel=3)
        if output not in OUTPUTS:
            raise InputError(f"output must be one of {OUTPUTS}, got {output!r}")
        check_guidance(guidance)
        rows, cols = height // im.MULTIPLE, width // im.MULTIPLE
        if r.sigmas is not None:
            sig = explicit_schedule(r.sigmas)
            if r.steps is not None and r.steps != len(sig) - 1:
                raise InputError(f"steps={r.steps} disagrees with the {len(sig) - 1} steps of sigmas {r.sigmas!r}")
        else:
            sig = schedule(self.variant.steps if r.steps is None else r.steps, rows * cols, self.variant.shift_schedule)
        x, used_seed = self._initial_noise(latents, 1, rows, cols, r.seed)
        plan = RunPlan(rows, cols, x, used_seed, sig, float(guidance), output, r.solver)
        return CheckedRequest(r, pils, sizes, width, height, guidance, len(sig) - 1, plan, self)

    @contextmanager
    def _collectives(self):
        """Under parallel, what issues collectives (a run's all-to-alls, the seed's broadcast) runs one at a time:
        every rank must make the same collectives in the same order, which two threads of one rank cannot promise.
        A second thread is refused at once (InputError), never left to hang or to mix the ranks' data."""
        if self.parallel is None:
            yield
            return
        if not self._one_at_a_time.acquire(blocking=False):
            raise InputError(
                "this sequence-parallel pipeline is running a call on another thread: under parallel=N every rank "
                "must make the same calls in the same order, from one thread (the server's worker does so)"
            )
        try:
            yield
        finally:
            self._one_at_a_time.release()

    def _initial_noise(self, latents, batch, rows, cols, seed):
        if latents is not None:
            want = (rows * cols, LATENT_CHANNELS * 4)
            if not isinstance(latents, torch.Tensor) or latents.ndim != 3 or tuple(latents.shape[1:]) != want:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise InputError(f"latents must be packed noise of shape [B, {want[0]}, {want[1]}], got {got}")
            return latents.to("cpu", torch.float32), None
        if seed is None and self.parallel is None:
            seed = secrets.randbits(63)
        elif seed is None:  # one seed for every rank (rank 0's): a broadcast
            with self._collectives():
                seed = self.parallel.random_seed(self.device)
        check_seed(seed)
        gen = torch.Generator().manual_seed(seed)  # noise drawn on the CPU: the same seed gives the same image anywhere
        noise = torch.randn(batch, LATENT_CHANNELS, 2 * rows, 2 * cols, generator=gen)
        return im.pack(noise), seed  # on the CPU until the run: a queued request holds no device memory

    def _conditioning(self, txt, pooled, guidance: torch.Tensor, ctx, sizes, rows, cols) -> Conditioning:
        """txt (B, T, D), pooled (B, D'), guidance (B,) float32, ctx (B, M, 64) or None from context images of
        `sizes` (width, height) each."""
        grids = [(rows, cols)] + [(h // im.MULTIPLE, w // im.MULTIPLE) for w, h in sizes]
        cos, sin = rope_table(sequence_ids(txt.shape[1], grids, self.device), self.cfg.axes_dim, self.cfg.theta)
        g = guidance.to(self.device) if self.cfg.guidance_embed else None
        return Conditioning(ctx, txt, pooled, g, cos, sin)

    @torch.inference_mode()
    def _execute(self, checked: list[CheckedRequest], progress, reports: list) -> list:
        """The one run path of edit, generate, run_batch and the server: checked requests of one batch key through
        one sampling loop, their contexts encoded, prompts encoded and outputs decoded per request. Returns one
        output per request: an image, or a list of them (latents of batch > 1), or the latents (output="latent")."""
        rows, cols = checked[0].plan.rows, checked[0].plan.cols
        if any(not torch.equal(c.plan.sigmas, checked[0].plan.sigmas) for c in checked[1:]):
            raise InputError("requests run together must have the same schedule (sigmas)")
        if any(c.plan.solver != checked[0].plan.solver for c in checked[1:]):
            raise InputError("requests run together must have the same solver")
        with self._collectives(), self._weights.reading():
            txts, pooleds, ctxs, guidance = [], [], [], []
            for c, report in zip(checked, reports, strict=True):
                n = c.plan.noise.shape[0]
                if c.pils:
                    with PhaseTimer(report, "vae_encode", self.device):
                        reuse = c.request.reuse_latents
                        ctx = [
                            self.context_cache.tokens(
                                pil, size, self._vae_runner.tiles("encode", *size), reuse, self._encode_context, report
                            )
                            for pil, size in zip(c.pils, c.sizes, strict=True)
                        ]
                    ctxs.append(torch.cat(ctx, 1).expand(n, -1, -1))
                with PhaseTimer(report, "text_encode", self.device):
                    txt, pooled = self.encode_prompt(c.request.prompt, report)
                txts.append(txt.expand(n, -1, -1))
                pooleds.append(pooled.expand(n, -1))
                guidance += [c.plan.guidance] * n
            ctx = torch.cat(ctxs) if ctxs else None
            cond = self._conditioning(
                torch.cat(txts), torch.cat(pooleds), torch.tensor(guidance), ctx, checked[0].sizes, rows, cols
            )
            x = torch.cat([c.plan.noise for c in checked]).to(self.device)
            shared = RunReport() if len(checked) > 1 else reports[0]
            steps, threshold = len(checked[0].plan.sigmas) - 1, checked[0].request.step_cache
            denoiser = FirstBlockCache(self.denoiser, threshold) if threshold else self.denoiser  # one per loop
            with PhaseTimer(shared, "denoise", self.device):
                x = denoise(denoiser, x, checked[0].plan.sigmas, cond, progress, checked[0].plan.solver)
            calls, cached = (denoiser.model_calls, denoiser.cached_steps) if threshold else (steps, 0)
            outputs, start = [], 0
            for c, report in zip(checked, reports, strict=True):
                n = c.plan.noise.shape[0]
                z, start = x[start : start + n], start + n
                if report is not None:
                    report.seed, report.steps, report.batch_size = c.plan.seed, steps, len(checked)
                    report.model_calls, report.cached_steps = calls, cached
                    if shared is not report:
                        report.timings["denoise"] = report.timings.get("denoise", 0.0) + shared.timings["denoise"]
                if c.plan.output == "latent":
                    outputs.append(z)
                    continue
                with PhaseTimer(report, "vae_decode", self.device):
                    images = im.to_pil(self._vae_runner.decode(im.unpack(z, rows, cols), cols * 16, rows * 16))
                if c.request.reuse_latents:
                    size = (cols * 16, rows * 16)
                    self.context_cache.keep(images, z.to(self.dtype), size, self._vae_runner.tiles("encode", *size))
                outputs.append(images[0] if n == 1 else images)
        return outputs


class EditSession:
    """A chain of edits: turn k edits turn k-1's output (the first turn edits the given image)."""

    def __init__(self, pipe: Pipeline, image, **defaults):
        self.pipe, self.defaults = pipe, defaults
        self.history = [im.load_image(image)]

    @property
    def image(self):
        return self.history[-1]

    def edit(self, prompt: str, **kwargs):
        args = {**self.defaults, **kwargs}
        if args.get("output", "pil") != "pil":
            raise InputError("a session edits images: output must be 'pil'")
        latents = args.get("latents")
        if isinstance(latents, torch.Tensor) and latents.ndim == 3 and latents.shape[0] != 1:
            raise InputError(f"a session edits one image per turn: latents must have batch 1, got {latents.shape[0]}")
        out = self.pipe.edit(self.image, prompt, **args)
        self.history.append(out)
        return out

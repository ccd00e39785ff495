"""The CLI's commands that prepare a deployment without serving a request: `plan` (the memory a run needs, from the
configs alone) and `export` (ONNX graphs, FP8 calibration, TensorRT engines)."""

from __future__ import annotations

import sys
from pathlib import Path

from kontext_rt.cli_args import DTYPE_NAMES, UsageError, finite_float, positive_int


def _plan_parser(sub):
    pl = sub.add_parser("plan", help="the memory a run needs on the device, from the configs alone (no weights read)")
    which = pl.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="diffusers folder or flux1-*.safetensors file")
    which.add_argument("--preset", help="a model config by name, no checkpoint needed: flux-kontext-dev, flux-dev, ...")
    pl.add_argument("--ae", help="ae.safetensors for a BFL single file (default: beside it)")
    pl.add_argument("--text-encoders", help="folder with text_encoder*/ (default: the checkpoint's)")
    pl.add_argument("--variant", help="what a BFL file holds when its shapes leave it open (sets the text tokens)")
    pl.add_argument("--width", type=positive_int, default=1024, help="output width, a multiple of 16")
    pl.add_argument("--height", type=positive_int, default=1024, help="output height, a multiple of 16")
    pl.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="bf16", help="the weights' dtype (default bf16)")
    pl.add_argument("--fp8", action="store_true", help="FP8 linears (needs --dtype bf16)")
    pl.add_argument("--text-tokens", type=positive_int, help="T5 tokens (default: the variant's max_sequence_length)")
    pl.add_argument("--no-context", action="store_true", help="text-to-image: no context image")
    pl.add_argument(
        "--placement", help="resident (default), lean, offload, or part=mode,...: where each part lives (see edit)"
    )
    pl.add_argument("--steps", type=positive_int, default=28, help="steps (rows of the modulation table; default 28)")
    pl.add_argument(
        "--vae-tiling", choices=["auto", "on", "off"], default="auto", help="whether the VAE may tile (default auto)"
    )


def _plan_model(args, dtype):
    """(transformer config, VAE config, variant or None, text encoders' bytes) of --preset or --checkpoint."""
    from kontext_rt import memory
    from kontext_rt.config import PRESETS, VAE_PRESETS, VARIANTS, Variant

    if args.preset is not None:
        if args.preset not in PRESETS:
            raise UsageError(f"unknown preset {args.preset!r}; one of {', '.join(PRESETS)}")
        for given in ("ae", "text_encoders", "variant"):
            if getattr(args, given) is not None:
                raise UsageError(f"--{given.replace('_', '-')} goes with --checkpoint, not --preset")
        cfg = PRESETS[args.preset]
        full = cfg.context_in_dim == 4096 and cfg.vec_in_dim == 768
        encoders = memory.standard_text_encoder_bytes(dtype) if full else 0
        return cfg, VAE_PRESETS["flux" if full else "tiny"], VARIANTS.get(args.preset, Variant(args.preset)), encoders
    from kontext_rt.weights.formats import detect

    checkpoint = detect(args.checkpoint, ae=args.ae, text_encoders=args.text_encoders)
    cfg, vae_cfg = checkpoint.transformer_config(), checkpoint.vae_config()
    variant = checkpoint.variant(args.variant) if args.text_tokens is None else None
    folder = checkpoint.text_encoders
    encoders = 0 if folder is None else memory.text_encoder_bytes(folder, dtype)
    return cfg, vae_cfg, variant, encoders


def _plan(args) -> int:
    import torch

    from kontext_rt import image as im
    from kontext_rt import memory
    from kontext_rt.load_spec import DEFAULT_TILE
    from kontext_rt.placement import PRESETS as PLACEMENTS
    from kontext_rt.placement import Placement

    placement = Placement.parse(args.placement)
    dtype = getattr(torch, DTYPE_NAMES[args.dtype])
    if args.fp8 and dtype != torch.bfloat16:
        raise UsageError(f"--fp8 linears produce bfloat16: use --dtype bf16, not {args.dtype}")
    im.check_output_size(args.width, args.height)
    if args.text_tokens is not None and args.text_tokens > 512:
        raise UsageError(f"--text-tokens must be at most 512 (T5's limit here), got {args.text_tokens}")
    cfg, vae_cfg, variant, encoders = _plan_model(args, dtype)
    tokens = (args.width // 16) * (args.height // 16)
    text_tokens = args.text_tokens or variant.max_sequence_length
    p = memory.plan(
        cfg,
        vae_cfg,
        dtype,
        args.fp8,
        text_tokens,
        tokens,
        0 if args.no_context else tokens,
        args.width,
        args.height,
        text_encoders=encoders,
        placement=placement,
        steps=args.steps,
        vae_tile=None if args.vae_tiling == "off" else DEFAULT_TILE,
    )
    print(p)
    others = ", ".join(f"{name} {p.placed(pl).budget / memory.GIB:.2f} GiB" for name, pl in PLACEMENTS.items())
    print(f"  planned total by placement preset: {others}")
    if not encoders:
        why = "a preset without the FLUX.1 text encoders' sizes" if args.preset else "none found beside the checkpoint"
        print(f"  (text encoders not counted: {why})")
    print(
        f"  planned from the configs (no weights read); the trace does not see allocator rounding, cuBLAS and "
        f"attention workspaces or the CUDA context: the {memory.MARGIN:.0%} margin stands for them"
    )
    return 0


def _export_parser(sub):
    x = sub.add_parser("export", help="ONNX graphs, FP8 calibration and TensorRT engines for backend='tensorrt'")
    x.add_argument("--checkpoint", required=True, help="diffusers folder or flux1-*.safetensors file")
    x.add_argument("--ae", help="ae.safetensors for a BFL single file (default: beside it)")
    x.add_argument("--text-encoders", help="folder with text_encoder*/ and tokenizer*/ (fp8 calibration, BFL files)")
    x.add_argument(
        "--variant",
        help="what a BFL file holds when its shapes leave it open (default: "
        "flux-kontext-dev; FLUX.1 [dev] gets the same engines)",
    )
    x.add_argument("--out", required=True, help="output folder (stages already finished there are reused)")
    x.add_argument("--precision", required=True, choices=["fp16", "bf16", "fp8"])
    x.add_argument("--onnx-only", action="store_true", help="stop after the ONNX graphs (no TensorRT needed)")
    x.add_argument("--device", help="where to load, calibrate and trace (default: cuda if available)")
    x.add_argument("--max-batch", type=positive_int, default=1, help="largest batch the engines accept")
    x.add_argument("--workspace-gib", type=finite_float, help="TensorRT builder workspace limit")
    x.add_argument("--calibration-prompts", help="fp8: a text file, one edit instruction per line")
    x.add_argument(
        "--calibration-images",
        nargs="+",
        default=[],
        help="fp8: context images (default: generated from the prompts by the model itself)",
    )
    x.add_argument("--calibration-steps", type=positive_int, default=8, help="fp8: sampling steps per edit")
    x.add_argument("--calibration-size", type=positive_int, default=1024, help="fp8: side of generated images")
    x.add_argument(
        "--calibration-no-auto-resize",
        action="store_true",
        help="fp8: keep the calibration images' size instead of a preferred Kontext resolution",
    )
    x.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def _export(args) -> int:
    import torch

    from kontext_rt.export.fp8 import DEFAULT_PROMPTS, CalibrationSet
    from kontext_rt.export.stages import Export, ExportOptions

    prompts = DEFAULT_PROMPTS
    if args.calibration_prompts:
        try:
            text = Path(args.calibration_prompts).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{args.calibration_prompts}: cannot read the prompts ({e})") from None
        prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
        if not prompts:
            raise UsageError(f"{args.calibration_prompts}: no prompts in it")
    for image in args.calibration_images:
        if not Path(image).is_file():
            raise UsageError(f"calibration image {image}: no such file")
    calibration = CalibrationSet(
        prompts,
        tuple(args.calibration_images),
        args.calibration_steps,
        args.calibration_size,
        not args.calibration_no_auto_resize,
    )
    opts = ExportOptions(
        Path(args.checkpoint),
        Path(args.out),
        args.precision,
        args.onnx_only,
        args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        args.ae,
        args.text_encoders,
        args.max_batch,
        calibration,
        args.workspace_gib,
        args.variant,
    )
    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        Export(opts, log).run()
    except ImportError as e:  # onnx, onnxscript or modelopt missing
        raise UsageError(f"export needs the export extra (pip install 'kontext-rt[export]'): {e}") from None
    if not args.quiet:
        print(f"export finished: {args.out}", file=sys.stderr)
    return 0

"""What the server accepts: its settings, the request fields of each route, uploaded images, and the errors' shape.

Every bad field becomes an ApiError (HTTP 4xx, an OpenAI-style JSON body naming the field) before the request is
queued; the pipeline's own checks (kontext_rt.arguments, kontext_rt.image) give the messages where they exist.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError, field_validator

from kontext_rt import Request, arguments
from kontext_rt import image as im
from kontext_rt.errors import InputError

# OpenAI's image endpoints take PNG, JPEG and WebP. Other formats are refused before decoding: PIL's EPS plugin, for
# one, runs Ghostscript on the upload.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


@dataclass(frozen=True)
class Settings:
    """The server's limits (the CLI's --max-* flags)."""

    max_queue: int = 16  # requests waiting for the model; one more gets 429
    max_batch: int = 4  # requests of one batch key run in one pipeline call
    max_upload_mb: float = 50.0  # a request body, images included (OpenAI's per-image limit)
    timeout_s: float = 600.0  # a request still queued this long after it arrived gets 503
    max_images: int = 4  # context images per edit (each adds as many tokens as the output)
    max_steps: int = 100  # denoising steps per request (FLUX's defaults: 28, schnell 4)
    safety: Callable | None = None  # image -> (allowed, reason), run on every output before it is returned

    def __post_init__(self):
        for name in ("max_queue", "max_batch", "max_images", "max_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        if self.safety is not None and not callable(self.safety):
            raise InputError(f"safety must be a callable image -> (allowed, reason), got {self.safety!r}")
        for name in ("max_upload_mb", "timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
                raise InputError(f"{name} must be a positive number, got {v!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class ApiError(Exception):
    """An error response: status, message, and the field at fault (OpenAI's error object)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_value", **kw):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = kw.get("type", "invalid_request_error")
        self.headers = kw.get("headers")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class GenerateFields(BaseModel):
    """The fields of a generation (JSON, or the form fields of a native request without images)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: StrictStr
    size: StrictStr | None = None  # "WxH"; "auto" or absent: the pipeline's default
    n: int = 1
    response_format: StrictStr = "b64_json"
    model: StrictStr | None = None  # accepted for OpenAI clients, ignored: the server runs one model
    user: StrictStr | None = None  # likewise
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    solver: StrictStr = "euler"  # kontext_rt.sampling.solvers.SOLVERS
    sigmas: list | StrictStr | None = None  # a JSON list of numbers or a comma string: an explicit schedule
    step_cache: float | None = None  # the first-block residual cache's threshold (lossy); None or 0: off

    @field_validator("n", "steps", "seed", "guidance", "step_cache", mode="before")
    @classmethod
    def _no_bool(cls, v):
        if isinstance(v, bool):  # pydantic's lax mode would read true as 1
            raise ValueError("must be a number, not a boolean")
        return v


class EditFields(GenerateFields):
    auto_resize: bool = True
    reuse_latents: bool = False  # keep the output's latents; a context that is a kept output skips its encode


def parse_fields(model: type[GenerateFields], data: dict) -> GenerateFields:
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown parameter {param!r}", param, "unknown_parameter") from None
        if err["type"] == "missing":
            raise ApiError(400, f"missing required parameter {param!r}", param, "missing_required_parameter") from None
        raise ApiError(400, f"{param}: {err['msg'].removeprefix('Value error, ')}", param) from None


def to_request(f: GenerateFields, images: list, settings: Settings) -> Request:
    """The checked fields as a pipeline Request (images: decoded PIL images, empty for a generation)."""
    if not f.prompt.strip():
        raise ApiError(400, "prompt must be a non-empty string", "prompt")
    if f.n != 1:
        raise ApiError(400, f"n must be 1 (one image per request), got {f.n}", "n")
    if f.response_format == "url":
        raise ApiError(
            400, "response_format 'url' is not supported: images come back inline as b64_json", "response_format"
        )
    if f.response_format != "b64_json":
        raise ApiError(400, f"response_format must be 'b64_json', got {f.response_format!r}", "response_format")
    width, height = parse_size(f.size)
    checks = (
        ("steps", f.steps, arguments.check_steps),
        ("guidance", f.guidance, arguments.check_guidance),
        ("seed", f.seed, arguments.check_seed),
        ("step_cache", f.step_cache, arguments.check_step_cache),
    )
    for name, value, check in checks:
        if value is not None:
            try:
                check(value)
            except InputError as e:
                raise ApiError(400, str(e), name) from None
    if f.steps is not None and f.steps > settings.max_steps:
        raise ApiError(400, f"steps must be at most {settings.max_steps} on this server, got {f.steps}", "steps")
    try:
        arguments.check_solver(f.solver)
    except InputError as e:
        raise ApiError(400, str(e), "solver") from None
    sigmas = None if f.sigmas is None else parse_request_sigmas(f.sigmas, f.steps, settings)
    if len(images) > settings.max_images:
        raise ApiError(400, f"at most {settings.max_images} context images, got {len(images)}", "image")
    auto_resize = getattr(f, "auto_resize", True)
    reuse_latents = getattr(f, "reuse_latents", False)
    return Request(
        f.prompt,
        tuple(images),
        width,
        height,
        f.steps,
        f.guidance,
        f.seed,
        auto_resize,
        f.solver,
        sigmas,
        f.step_cache,
        reuse_latents,
    )


def parse_request_sigmas(value, steps: int | None, settings: Settings) -> tuple[float, ...]:
    """The sigmas field as explicit_schedule's values (a terminal 0 appended if absent); 400 naming the field."""
    try:
        sig = arguments.parse_sigmas(value)
    except InputError as e:
        raise ApiError(400, str(e), "sigmas") from None
    n = len(sig) - 1
    if steps is not None and steps != n:
        raise ApiError(400, f"steps={steps} disagrees with the {n} steps of sigmas", "sigmas")
    if n > settings.max_steps:
        raise ApiError(400, f"sigmas must give at most {settings.max_steps} steps on this server, got {n}", "sigmas")
    return tuple(sig.tolist())


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WxH' -> (W, H), each a multiple of 16 up to kontext_rt.image.MAX_SIDE; None or 'auto' -> (None, None)."""
    if size is None or size == "auto":
        return None, None
    m = SIZE_RE.match(size)
    if not m:
        raise ApiError(400, f"size must be 'WIDTHxHEIGHT' (such as '1024x768') or 'auto', got {size!r}", "size")
    width, height = int(m[1]), int(m[2])
    try:
        im.check_output_size(width, height)
    except InputError as e:
        raise ApiError(400, f"size {size}: {e}", "size") from None
    return width, height


def decode_image(data: bytes, name: str) -> Image.Image:
    """Uploaded bytes -> a decoded image (the pipeline's check converts it to RGB, once). Refused (InputError):
    empty, not PNG/JPEG/WebP, truncated, or over kontext_rt.image.MAX_PIXELS (checked from the header, before the
    pixels are decoded: decompression bombs)."""
    if not data:
        raise InputError(f"{name} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            pil = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            im.check_input_pixels(pil.size, "image", im.MAX_PIXELS)  # before the pixels are decoded
            pil.load()
            return pil
    except InputError as e:
        raise InputError(f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise InputError(f"{name} is not a PNG, JPEG or WebP image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{name} is refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, EOFError, ValueError) as e:  # a truncated or corrupt file, found while decoding
        raise InputError(f"{name} is a broken image ({e})") from None


def decode_base64(value, name: str) -> bytes:
    """A JSON image: base64 text, optionally a data URL (data:image/png;base64,...)."""
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a base64 string, got {type(value).__name__}", "image")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{name} is not valid base64", "image") from None


def encode_png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")

"""T5 + CLIP text encoding behind a text-embedding cache (docs/model.md, Text encoders).

The encoders load lazily, on the first cache miss: a server whose prompts are all cached never loads T5-XXL.
The tokenizers (small files) load at once and are checked: transformers builds a T5 tokenizer from its special
tokens alone when tokenizer.json is missing, and would turn every prompt into <unk> without a word.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kontext_rt.errors import CheckpointError, InputError, PromptTruncated
from kontext_rt.weights.safetensors_io import digest_file

SUBFOLDERS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
# What each tokenizer is built from (any one set of files): CLIPTokenizer and T5TokenizerFast's vocab_files_names.
TOKENIZER_FILES = {
    "tokenizer": (("tokenizer.json",), ("vocab.json", "merges.txt")),
    "tokenizer_2": (("tokenizer.json",), ("spiece.model",)),
}
ENCODER_OF = {"tokenizer": "text_encoder", "tokenizer_2": "text_encoder_2"}
PROBE = "a photo of a cat"  # plain words every real vocabulary holds: an <unk> among them means no vocabulary


def _missing(folder: Path) -> list[str]:
    return [s for s in SUBFOLDERS if not (folder / s).is_dir()]


def _check_tokenizer_files(folder: Path):
    for sub, alternatives in TOKENIZER_FILES.items():
        if not any(all((folder / sub / f).is_file() for f in files) for files in alternatives):
            need = " or ".join(" + ".join(files) for files in alternatives)
            raise CheckpointError(f"{folder / sub}: no tokenizer files (it needs {need})")


def _check_tokenizer(tok, folder: Path, sub: str):
    """Refuse a tokenizer that maps plain words to <unk>, or has ids past its encoder's embedding table."""
    ids = tok(PROBE, add_special_tokens=False).input_ids
    if tok.unk_token_id is not None and tok.unk_token_id in ids:
        raise CheckpointError(
            f"{folder / sub}: unusable tokenizer: {PROBE!r} maps to {tok.unk_token} (a "
            f"{len(tok)}-token vocabulary); its tokenizer files are damaged or not this model's"
        )
    try:
        rows = json.loads((folder / ENCODER_OF[sub] / "config.json").read_text())["vocab_size"]
    except (OSError, ValueError, KeyError):
        return  # the encoder's own load reports its config
    if len(tok) > rows:
        raise CheckpointError(
            f"{folder / sub}: {len(tok)} tokens, but {ENCODER_OF[sub]} embeds only {rows}: "
            "the tokenizer is not this encoder's"
        )


def fingerprint(folder: Path) -> str:
    """A hash that changes with the text-encoder weights without reading 9.5 GB: every config and tokenizer
    file in full, each safetensors file sampled (safetensors_io.digest_file)."""
    h = hashlib.sha256()
    for sub in SUBFOLDERS:
        for path in sorted((folder / sub).iterdir()):
            if path.is_file():
                h.update(f"{sub}/".encode())
                digest_file(h, path)
    return h.hexdigest()[:32]


class TextEncoders:
    """CLIP-L (pooled) + T5 (sequence) from a diffusers-layout folder, loaded on first use, thread-safe."""

    def __init__(self, folder: Path, device, dtype: torch.dtype, placement: str = "device"):
        """placement (kontext_rt.placement.Placement.text_encoders): "device" keeps them on `device` once loaded,
        "staged" keeps them in host memory and copies them to `device` for each encode, "cpu" runs them there."""
        folder = Path(folder)
        if missing := _missing(folder):
            raise CheckpointError(f"{folder}: text encoders missing ({', '.join(missing)})")
        _check_tokenizer_files(folder)
        self.folder, self.dtype, self.placement = folder, dtype, placement
        # where the encoders run: the pipeline's device, unless they are kept on the CPU
        self.device = torch.device("cpu") if placement == "cpu" else torch.device(device)
        self._lock = threading.Lock()
        # a fast tokenizer's truncation and padding settings live on its Rust object: two threads calling it with
        # different settings collide ("Already borrowed"), so every call holds this lock
        self._tokenizer_lock = threading.Lock()
        self._tokenizers = self._load_tokenizers()
        self._models = None
        self._fingerprint = None

    @property
    def fingerprint(self) -> str:
        with self._lock:
            if self._fingerprint is None:
                self._fingerprint = fingerprint(self.folder)
            return self._fingerprint

    @property
    def identity(self) -> str:
        """What an embedding depends on besides the prompt: the weights' fingerprint, the dtype and the hardware
        the encoders run on (the CPU and a GPU round differently), for the text-cache key."""
        where = self.device.type
        if where == "cuda":
            where = torch.cuda.get_device_name(self.device)
        return f"{self.fingerprint}|{self.dtype}|{where}"

    @property
    def loaded(self) -> bool:
        return self._models is not None

    def _load_tokenizers(self):
        from transformers import CLIPTokenizer, T5TokenizerFast

        try:
            tok = CLIPTokenizer.from_pretrained(self.folder / "tokenizer", local_files_only=True)
            tok2 = T5TokenizerFast.from_pretrained(self.folder / "tokenizer_2", local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{self.folder}: cannot load the tokenizers ({e})") from None
        _check_tokenizer(tok, self.folder, "tokenizer")
        _check_tokenizer(tok2, self.folder, "tokenizer_2")
        return tok, tok2

    def _load(self):
        from transformers import CLIPTextModel, T5EncoderModel

        kw = dict(local_files_only=True, use_safetensors=True, dtype=self.dtype)
        try:
            clip = CLIPTextModel.from_pretrained(self.folder / "text_encoder", **kw)
            t5 = T5EncoderModel.from_pretrained(self.folder / "text_encoder_2", **kw)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.folder}: cannot load the text encoders ({e})") from None
        models = tuple(m.eval().requires_grad_(False) for m in (clip, t5))
        if self.placement == "staged":
            from kontext_rt.streaming import Staged

            return tuple(Staged(m, self.device) for m in models)
        return tuple(m.to(self.device) for m in models)

    def warn_if_truncated(self, prompt: str, max_sequence_length: int) -> None:
        """Warn (PromptTruncated) when the prompt has more tokens than T5 (max_sequence_length) or CLIP read."""
        tok, tok2 = self._tokenizers
        over = []
        with self._tokenizer_lock:
            n2 = len(tok2(prompt, verbose=False).input_ids)  # with the closing </s>, as encode counts it
            n = len(tok(prompt, verbose=False).input_ids)  # with <|startoftext|> and <|endoftext|>
        if n2 > max_sequence_length:
            over.append(f"{n2} T5 tokens, max_sequence_length {max_sequence_length}")
        if n > tok.model_max_length:
            over.append(f"{n} CLIP tokens, CLIP's limit {tok.model_max_length}")
        if over:
            warnings.warn(
                PromptTruncated(f"the prompt is truncated ({'; '.join(over)}): the tokens past the limit are ignored"),
                stacklevel=3,
            )

    @torch.inference_mode()
    def encode(self, prompt: str, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> txt (1, max_sequence_length, D_t5), pooled (1, D_clip). Padded to full length, no attention mask."""
        with self._lock:
            if self._models is None:
                self._models = self._load()
        (tok, tok2), (clip, t5) = self._tokenizers, self._models
        with self._tokenizer_lock:
            ids = tok(
                [prompt], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            ids2 = tok2(
                [prompt], padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
            ).input_ids
        if self.placement == "staged":
            with clip.on_device() as clip_on, t5.on_device() as t5_on:
                return self._run(clip_on, t5_on, ids, ids2)
        return self._run(clip, t5, ids, ids2)

    def _run(self, clip, t5, ids, ids2):
        pooled = clip(ids.to(self.device)).pooler_output
        txt = t5(ids2.to(self.device)).last_hidden_state
        return txt, pooled


@dataclass
class CacheStats:
    hits: int = 0  # memory or disk
    disk_hits: int = 0
    misses: int = 0


class TextEmbeddingCache:
    """LRU in memory plus an optional folder of safetensors files, keyed by prompt, length and encoder hash."""

    def __init__(self, capacity: int = 64, folder: Path | None = None):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise InputError(f"text cache size (capacity) must be an integer >= 0, got {capacity!r}")
        self.capacity, self.folder = capacity, Path(folder) if folder else None
        self._lru: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @staticmethod
    def key(prompt: str, max_sequence_length: int, encoder_hash: str) -> str:
        return hashlib.sha256(json.dumps([encoder_hash, max_sequence_length, prompt]).encode()).hexdigest()

    def get(self, key: str):
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                self.stats.hits += 1
                return self._lru[key]
        value = self._read(key)
        with self._lock:
            if value is None:
                self.stats.misses += 1
                return None
            self.stats.hits += 1
            self.stats.disk_hits += 1
            self._remember(key, value)
        return value

    def put(self, key: str, value: tuple[torch.Tensor, torch.Tensor], prompt: str = ""):
        with self._lock:
            self._remember(key, value)
        if self.folder is not None:
            try:
                self._write(key, value, prompt)
            except OSError as e:  # a full disk or a removed folder costs the disk entry, never the edit
                warnings.warn(f"text cache {self.folder}: entry not written ({e})", RuntimeWarning, stacklevel=3)

    def _remember(self, key, value):
        if self.capacity == 0:
            return
        self._lru[key] = value
        self._lru.move_to_end(key)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def _read(self, key: str):
        if self.folder is None or not self._path(key).is_file():
            return None
        try:
            t = load_file(self._path(key))
            return t["txt"], t["pooled"]
        except Exception:  # a damaged cache entry is a miss, never an error: it is rewritten
            return None

    def _write(self, key, value, prompt: str):
        """Atomic: a temporary file in the same folder, then a rename; readers never see a partial entry."""
        self.folder.mkdir(parents=True, exist_ok=True)
        txt, pooled = (v.detach().cpu().contiguous() for v in value)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"txt": txt, "pooled": pooled}, tmp, metadata={"prompt": prompt})
            os.replace(tmp, self._path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

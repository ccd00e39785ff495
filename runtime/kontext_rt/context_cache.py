"""Context images' latent tokens, kept by content: an image edited many times is encoded once, and an output handed
back as the next turn's context can skip its decode-encode round trip.

An entry is keyed by the image's pixels (a BLAKE2 digest of its RGB bytes and size), the size it is encoded at and
whether that encode runs in tiles (VAERunner.tiles), and holds its packed latent tokens (1, N, 64) in the pipeline's
dtype, on its device. Two kinds:

- "encoded": what the VAE's encoder made of those pixels at that size. Taking it is exact: the same tokens a
  fresh encode gives (the encode is the VAE's deterministic mode, one image at a time, tiled or not by size only).
  Every edit looks these up.
- "kept": the denoised latents a request with reuse_latents=True decoded into those pixels. A later request with
  reuse_latents=True that gives those pixels back as a context image, at the size they were made at, takes these
  latents as its context tokens in place of encoding the decoded image: no decode-encode round trip (the VAE's
  loss and the 8-bit rounding), and no encode. Not the same tokens as an encode of the pixels: off by default;
  docs/quality.md measures both ways over several turns.

Least recently used entries go first beyond `capacity` (0: no cache, nothing hashed). One cache per pipeline,
guarded by a lock: requests from several threads share it; two that miss at once both encode, and the second put
wins (the same tokens).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from PIL import Image

from kontext_rt.errors import InputError

KINDS = ("encoded", "kept")


@dataclass
class ContextCacheStats:
    hits: int = 0  # context images whose encoded tokens were found
    kept_hits: int = 0  # context images that took an earlier output's kept latents
    misses: int = 0  # context images encoded


class ContextCache:
    def __init__(self, capacity: int = 16):
        check_capacity(capacity)
        self.capacity = capacity
        self._lru: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = ContextCacheStats()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @staticmethod
    def key(pil: Image.Image, size: tuple[int, int], tiled: bool = False) -> tuple:
        """(digest of the pixels, their size, the encode size, whether that encode runs in tiles: other tokens):
        what an entry is found by."""
        digest = hashlib.blake2b(pil.tobytes(), digest_size=20, person=pil.mode.encode()[:16])
        return digest.hexdigest(), pil.size, tuple(size), bool(tiled)

    def get(self, key: tuple, kind: str) -> torch.Tensor | None:
        """The tokens of `kind` under key, or None (counted: a kept miss is not counted, the encoded lookup follows)."""
        with self._lock:
            tokens = self._lru.get((kind, *key))
            if tokens is not None:
                self._lru.move_to_end((kind, *key))
                if kind == "kept":
                    self.stats.kept_hits += 1
                else:
                    self.stats.hits += 1
            elif kind == "encoded":
                self.stats.misses += 1
            return tokens

    def tokens(self, pil, size: tuple[int, int], tiled: bool, reuse: bool, encode, report=None) -> torch.Tensor:
        """One context image's tokens (1, N, 64): an earlier output's kept latents (reuse), the cached encode of the
        same pixels at the same size and tiling, or encode(pil, size), then cached. report (a RunReport) counts
        context_cache_hits and reused_latents."""
        if not self.enabled:
            return encode(pil, size)
        key = self.key(pil, size, tiled)
        found = self.get(key, "kept") if reuse else None
        if found is not None:
            if report is not None:
                report.reused_latents += 1
            return found
        found = self.get(key, "encoded")
        if found is None:
            found = encode(pil, size)
            self.put(key, "encoded", found)
        elif report is not None:
            report.context_cache_hits += 1
        return found

    def keep(self, images: list, latents: torch.Tensor, size: tuple[int, int], tiled: bool) -> None:
        """Remember the latents (B, N, 64) each output image was decoded from, for a later reuse_latents edit of it;
        keyed as tokens() looks it up (the size it was made at, that size's tiling)."""
        if self.enabled:
            for img, row in zip(images, latents.split(1), strict=True):
                self.put(self.key(img, size, tiled), "kept", row.clone())  # its own storage, not a view of the batch

    def put(self, key: tuple, kind: str, tokens: torch.Tensor) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        with self._lock:
            if self.capacity == 0:
                return
            self._lru[(kind, *key)] = tokens
            self._lru.move_to_end((kind, *key))
            while len(self._lru) > self.capacity:
                self._lru.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()

    def __len__(self) -> int:
        return len(self._lru)


def check_capacity(capacity) -> None:
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
        raise InputError(f"context_cache_size must be an integer >= 0 (0: off), got {capacity!r}")

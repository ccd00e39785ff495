"""Checkpoint formats: a diffusers folder or a BFL single file, behind one interface.

    fmt = detect(path, ae=None, text_encoders=None)      # DiffusersFolder | BFLFile; reads no tensor
    fmt.transformer_config(), fmt.vae_config()           # from config.json or the safetensors headers, read once
    fmt.variant(stated=None, if_ambiguous=None)          # sampling defaults (config.VARIANTS), before any weights
    fmt.load_transformer(dtype, device), fmt.load_vae(dtype, device)
    fmt.fingerprint()                                    # identity of the weights, recorded by exports
    fmt.text_encoders                                    # the folder of text_encoder*/ and tokenizer*/, or None

The variant comes from configuration or tensor shapes, never from a file name. A diffusers folder says it:
model_index.json's pipeline class (Kontext or not) and the scheduler (schnell: no guidance embedding, no shifted
schedule). A BFL file only shows shapes: schnell has no guidance_in, but FLUX.1 [dev] and FLUX.1 Kontext [dev]
have the same tensors, so the caller states which (variant=, CLI --variant); left unstated it is an error naming
the choices, raised before any weights are read. A stated variant the checkpoint contradicts is an error too.

A found checkpoint is a value read once: its configs, variant evidence and trained sizes are read on first use and
kept (a load, the CLI's checks before it and the memory plan share one object: Pipeline.from_pretrained takes it
as its path), so a request reads each config file once.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from kontext_rt.config import PRESETS, VARIANTS, FluxConfig, VAEConfig, Variant
from kontext_rt.errors import CheckpointError, InputError
from kontext_rt.model.transformer import FluxTransformer
from kontext_rt.model.vae import AutoEncoder
from kontext_rt.weights.configs import (
    bfl_transformer_config,
    bfl_vae_config,
    diffusers_transformer_config,
    diffusers_vae_config,
    read_json,
)
from kontext_rt.weights.loading import component_files, header_shapes, load_into, on_meta, shapes_of, strip_prefix
from kontext_rt.weights.mapping import Rule, diffusers_transformer_rules, diffusers_vae_rules, identity_rules
from kontext_rt.weights.safetensors_io import TensorFiles, digest_file

BFL_PREFIXES = ("model.diffusion_model.",)
AE_PREFIXES = ("first_stage_model.", "vae.")
DIFFUSERS_STEM = "diffusion_pytorch_model"


class CheckpointFormat(ABC):
    """One checkpoint on disk: where its parts are, their configs, key rules and variant, and how to load them."""

    transformer: Path  # the transformer's tensors (a folder or a file), as error messages name it
    vae: Path
    text_encoders: Path | None  # a folder holding text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/

    @classmethod
    @abstractmethod
    def claims(cls, path: Path) -> bool:
        """Whether `path` (which exists) is a checkpoint of this format."""

    @classmethod
    @abstractmethod
    def open(cls, path: Path, ae=None, text_encoders=None) -> CheckpointFormat:
        """The checkpoint at `path`, its parts located (and checked to exist); no tensor is read."""

    @abstractmethod
    def read_transformer_config(self) -> FluxConfig:
        """From config.json or the tensor headers, without reading any weights (transformer_config keeps it)."""

    @abstractmethod
    def read_vae_config(self) -> VAEConfig:
        """From config.json or the tensor headers, without reading any weights (vae_config keeps it)."""

    @abstractmethod
    def transformer_rules(self, shapes: dict[str, tuple[int, ...]]) -> list[Rule]:
        """The key rules: each runtime transformer tensor (name -> shape) from this format's tensors."""

    @abstractmethod
    def vae_rules(self, shapes: dict[str, tuple[int, ...]]) -> list[Rule]:
        """The key rules: each runtime autoencoder tensor (name -> shape) from this format's tensors."""

    @abstractmethod
    def transformer_tensors(self) -> tuple[TensorFiles, dict[str, str]]:
        """The transformer's files and {key as the rules spell it: key in the files}; headers only."""

    @abstractmethod
    def vae_tensors(self) -> tuple[TensorFiles, dict[str, str]]:
        """The autoencoder's files and {key as the rules spell it: key in the files}; headers only."""

    @abstractmethod
    def read_variant_evidence(self) -> tuple[tuple[str, ...], str]:
        """(the names in config.VARIANTS this checkpoint can be, what in the checkpoint says so)."""

    def read_preferred_resolutions(self) -> tuple[tuple[int, int], ...] | None:
        return None

    # ---- shared: each read once per found checkpoint ----------------------------------------------------------

    @property
    @abstractmethod
    def path(self) -> Path:
        """What the caller named: the folder, or the transformer's file."""

    @cached_property
    def _transformer_config(self) -> FluxConfig:
        return self.read_transformer_config()

    @cached_property
    def _vae_config(self) -> VAEConfig:
        return self.read_vae_config()

    @cached_property
    def _variant_evidence(self) -> tuple[tuple[str, ...], str]:
        return self.read_variant_evidence()

    @cached_property
    def _preferred_resolutions(self) -> tuple[tuple[int, int], ...] | None:
        return self.read_preferred_resolutions()

    def transformer_config(self) -> FluxConfig:
        """The transformer's config, read on first use, without reading any weights."""
        return self._transformer_config

    def vae_config(self) -> VAEConfig:
        """The autoencoder's config, read on first use, without reading any weights."""
        return self._vae_config

    def variant_evidence(self) -> tuple[tuple[str, ...], str]:
        """(the names in config.VARIANTS this checkpoint can be, what in the checkpoint says so)."""
        return self._variant_evidence

    def variants(self) -> tuple[str, ...]:
        """The variants this checkpoint's configuration or tensor shapes allow (more than one: ambiguous)."""
        return self.variant_evidence()[0]

    def variant(self, stated: str | None = None, if_ambiguous: str | None = None) -> Variant:
        """The checkpoint's variant, read before any weights.

        stated: the caller's word (a name in config.VARIANTS); an error when the checkpoint contradicts it.
        if_ambiguous: taken only when the checkpoint allows several variants and none is stated (the CLI's
        `edit` passes flux-kontext-dev: the user asked for an edit). Otherwise ambiguity is an error naming the
        choices and the option that makes one."""
        for name in (stated, if_ambiguous):
            if name is not None and name not in VARIANTS:
                raise InputError(f"variant {name!r} is not one of {', '.join(VARIANTS)}")
        fits, evidence = self.variant_evidence()
        if stated is not None:
            if stated not in fits:
                raise CheckpointError(
                    f"{self.transformer}: variant {stated!r} does not fit this checkpoint: "
                    f"{evidence}, so it is {' or '.join(fits)}"
                )
            return VARIANTS[stated]
        if len(fits) == 1:
            return VARIANTS[fits[0]]
        if if_ambiguous in fits:
            return VARIANTS[if_ambiguous]
        raise CheckpointError(
            f"{self.transformer}: {evidence}, so it may be any of {', '.join(fits)}; say which "
            f"with variant=NAME (CLI: --variant NAME)"
        )

    def preferred_resolutions(self) -> tuple[tuple[int, int], ...] | None:
        """The output sizes (width, height) the checkpoint says it was trained at; None when it says nothing (FLUX.1
        itself: the Kontext preferred resolutions, about 1 MP)."""
        return self._preferred_resolutions

    def load_transformer(self, dtype: torch.dtype, device) -> FluxTransformer:
        cfg = self.transformer_config()
        model = on_meta(lambda: FluxTransformer(cfg))
        files, names = self.transformer_tensors()
        return load_into(model, self.transformer_rules(shapes_of(model)), files, names, dtype, device, self.transformer)

    def load_vae(self, dtype: torch.dtype, device) -> AutoEncoder:
        cfg = self.vae_config()
        model = on_meta(lambda: AutoEncoder(cfg))
        files, names = self.vae_tensors()
        return load_into(model, self.vae_rules(shapes_of(model)), files, names, dtype, device, self.vae)

    def fingerprint(self) -> str:
        """Identity of the transformer and VAE an export is made from (weights sampled, configs in full): exported
        graphs and engines record it, and the runtime refuses engines whose fingerprint differs from the
        checkpoint's. (text.fingerprint is the text encoders' own, for the embedding cache.)"""
        h = hashlib.sha256()
        for part in (self.transformer, self.vae):
            files = (
                sorted(p for p in part.iterdir() if p.suffix in (".safetensors", ".json")) if part.is_dir() else [part]
            )
            for path in files:
                digest_file(h, path)
        return h.hexdigest()[:32]


@dataclass(frozen=True)
class DiffusersFolder(CheckpointFormat):
    """model_index.json, transformer/, vae/ (each a config.json and safetensors, maybe sharded), scheduler/."""

    root: Path
    text_encoders: Path | None

    @property
    def path(self) -> Path:
        return self.root

    @property
    def transformer(self) -> Path:
        return self.root / "transformer"

    @property
    def vae(self) -> Path:
        return self.root / "vae"

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_dir() and (path / "model_index.json").is_file()

    @classmethod
    def open(cls, path: Path, ae=None, text_encoders=None) -> DiffusersFolder:
        if ae is not None:
            raise InputError(
                f"ae={ae}: a diffusers folder has its own vae/ ({path}); ae= names the autoencoder "
                "file of a BFL single-file checkpoint"
            )
        return cls(Path(path), Path(text_encoders or path))

    @cached_property
    def model_index(self) -> dict:
        """model_index.json, read once."""
        return read_json(self.root / "model_index.json")

    def read_transformer_config(self) -> FluxConfig:
        return diffusers_transformer_config(self.transformer)

    def read_vae_config(self) -> VAEConfig:
        return diffusers_vae_config(self.vae)

    def transformer_rules(self, shapes):
        return diffusers_transformer_rules(shapes)

    def vae_rules(self, shapes):
        return diffusers_vae_rules(shapes, len(self.vae_config().ch_mult))

    def transformer_tensors(self):
        files = component_files(self.transformer, DIFFUSERS_STEM)
        return files, {k: k for k in files.keys()}

    def vae_tensors(self):
        files = component_files(self.vae, DIFFUSERS_STEM)
        return files, {k: k for k in files.keys()}

    def read_preferred_resolutions(self):
        """model_index.json's "_kontext_rt": {"preferred_resolutions": [[width, height], ...]} (a key diffusers
        ignores, as it does every key that starts with _): a checkpoint trained at other sizes than FLUX.1's."""
        index = self.root / "model_index.json"
        declared = self.model_index.get("_kontext_rt", {})
        sizes = declared.get("preferred_resolutions") if isinstance(declared, dict) else None
        if sizes is None:
            return None
        ok = (
            isinstance(sizes, list)
            and sizes
            and all(
                isinstance(s, list) and len(s) == 2 and all(type(v) is int and 0 < v <= 2048 and v % 16 == 0 for v in s)
                for s in sizes
            )
        )
        if not ok:
            raise CheckpointError(
                f"{index}: _kontext_rt.preferred_resolutions must be a list of [width, height], multiples of 16 up "
                f"to 2048, got {sizes!r}"
            )
        return tuple((w, h) for w, h in sizes)

    def read_variant_evidence(self):
        guided = self.transformer_config().guidance_embed
        sched = self.root / "scheduler" / "scheduler_config.json"
        shift = read_json(sched).get("use_dynamic_shifting", True) if sched.is_file() else guided
        if not guided and not shift:
            return ("flux-schnell",), "its transformer has no guidance embedding and its scheduler no shift"
        name = self.model_index.get("_class_name", "")
        fits = "flux-kontext-dev" if "Kontext" in name else "flux-dev"
        return (fits,), f"its model_index.json names the pipeline {name or '(none)'}"


@dataclass(frozen=True)
class BFLFile(CheckpointFormat):
    """A Black Forest Labs single file (BFL names, maybe under model.diffusion_model.), ae.safetensors (LDM
    names) and the text encoders in a diffusers-layout folder. The files carry no config: shapes say it all."""

    transformer: Path
    vae: Path
    text_encoders: Path | None

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_file() and path.suffix == ".safetensors"

    @classmethod
    def open(cls, path: Path, ae=None, text_encoders=None) -> BFLFile:
        ae = Path(ae) if ae else path.parent / "ae.safetensors"
        if not ae.is_file():
            raise CheckpointError(f"{ae}: the autoencoder file is missing (pass ae=PATH to name it)")
        tenc = Path(text_encoders) if text_encoders else path.parent
        return cls(path, ae, tenc if (tenc / "text_encoder_2").is_dir() else None)

    @property
    def path(self) -> Path:
        return self.transformer

    def read_transformer_config(self) -> FluxConfig:
        return bfl_transformer_config(header_shapes(self.transformer, BFL_PREFIXES), self.transformer)

    def read_vae_config(self) -> VAEConfig:
        return bfl_vae_config(header_shapes(self.vae, AE_PREFIXES), self.vae)

    def transformer_rules(self, shapes):
        return identity_rules(shapes)

    def vae_rules(self, shapes):
        return identity_rules(shapes)

    def transformer_tensors(self):
        files = TensorFiles([self.transformer])
        return files, strip_prefix(files, BFL_PREFIXES)

    def vae_tensors(self):
        files = TensorFiles([self.vae])
        return files, strip_prefix(files, AE_PREFIXES)

    def read_variant_evidence(self):
        guided = self.transformer_config().guidance_embed
        fits = tuple(name for name in VARIANTS if PRESETS[name].guidance_embed == guided)
        return fits, f"its tensors {'include' if guided else 'lack'} a guidance embedding (guidance_in)"


FORMATS: tuple[type[CheckpointFormat], ...] = (DiffusersFolder, BFLFile)


def detect(path, ae=None, text_encoders=None) -> CheckpointFormat:
    """The checkpoint at `path` in whichever format claims it. ae: a BFL file's autoencoder (default: the
    ae.safetensors beside it). text_encoders: the folder of text_encoder*/ and tokenizer*/ (default: the
    checkpoint's own folder; None on the result when a BFL file has none beside it)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (a diffusers folder or a flux1-*.safetensors file)")
    for fmt in FORMATS:
        if fmt.claims(path):
            return fmt.open(path, ae=ae, text_encoders=text_encoders)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: neither checkpoint layout: a diffusers folder has model_index.json, a BFL "
            "checkpoint is a single .safetensors file"
        )
    raise CheckpointError(f"{path}: only .safetensors checkpoints are loaded (pickle files never are)")

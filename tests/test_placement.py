"""Placement: every mode gives the resident pipeline's pixels bit for bit, and the streamed weights really leave.

On the CPU "host" and "device" are the same memory, but the modes still copy: a device copy is a new tensor, so the
tests can see which tensors a module holds at each moment (its host tensors, or copies made for a visit)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

import kontext_rt as krt
from kontext_rt.errors import InputError
from kontext_rt.placement import PRESETS, Placement
from kontext_rt.streaming import HostTensors, Staged, Streamed

MODES = {
    **PRESETS,
    "encoders-staged": Placement(text_encoders="staged"),
    "blocks-only": Placement(transformer="offload"),  # the modulation linears stay resident: not the blocks' to move
}


def picture(seed: int, w: int = 48, h: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def run(pipe, seed=3, steps=2):
    """An edit to pixels (VAE encode, transformer, VAE decode) and a generation's latents."""
    edited = pipe.edit(picture(seed), "make it red", steps=steps, seed=seed, auto_resize=False)
    return [
        torch.from_numpy(np.array(edited)),
        pipe.generate("a red fox", width=32, height=48, steps=steps, seed=seed, output="latent"),
    ]


def load(path, placement=None, **kw):
    return krt.Pipeline.from_pretrained(path, placement=placement, **kw)


@pytest.fixture(scope="module")
def resident(kontext_dir):
    return run(load(kontext_dir))


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_resident_pixels(kontext_dir, resident, mode):
    got = run(load(kontext_dir, MODES[mode]))
    for a, b in zip(got, resident, strict=True):
        assert torch.equal(a, b)


def test_offload_with_fp8_and_the_per_step_loop_matches_resident(kontext_dir):
    """FP8 weights streamed, and the modulation layers streamed at every step (the per-step loop builds its table
    inside each step, the hoisted one once: test_every_mode covers that one)."""
    opt = krt.Optimizations(fp8="dynamic", hoist=False)
    args = dict(prompt="x", width=32, height=32, steps=2, seed=1, output="latent")
    want = load(kontext_dir, dtype=torch.bfloat16, optimize=opt).generate(**args)
    assert torch.equal(load(kontext_dir, "offload", dtype=torch.bfloat16, optimize=opt).generate(**args), want)


def ptrs(tensors) -> set[int]:
    """Where the tensors' memory is: a copy made for a visit is elsewhere, a view or a new wrapper is not."""
    return {t.untyped_storage().data_ptr() for t in tensors}


def block_tensors(model, exclude_modulation=True):
    mod = {id(t) for lin in model.modulation_layers() for t in lin.parameters()}
    return [
        [t for t in block.parameters() if not exclude_modulation or id(t) not in mod]
        for block in (*model.double_blocks, *model.single_blocks)
    ]


def test_offloaded_blocks_visit_two_at_a_time_and_leave_between_steps(kontext_dir):
    pipe = load(kontext_dir, "offload")
    model = pipe.transformer
    residency = model.residency
    hosts = [ptrs(u.host) for u in residency.blocks.units]
    mod_hosts = ptrs(t for u in residency.modulation.units for t in u.host)
    seen = []

    def between_steps(done, total):
        # every block and modulation layer holds its host tensors again: nothing of theirs stays attached
        for i, tensors in enumerate(block_tensors(model)):
            assert ptrs(tensors) == hosts[i]
        assert ptrs(t for lin in model.modulation_layers() for t in lin.parameters()) == mod_hosts
        seen.append(done)

    inside = []
    block = model.single_blocks[0]
    hook = block.register_forward_pre_hook(lambda m, a: inside.append(ptrs(m.linear1.parameters())))
    try:
        pipe.edit(picture(0), "x", steps=2, seed=0, auto_resize=False, output="latent", progress=between_steps)
    finally:
        hook.remove()
    assert seen == [1, 2]
    host_linear1 = ptrs(model.single_blocks[0].linear1.parameters())  # between runs: the host tensors
    assert host_linear1 <= hosts[len(model.double_blocks)]
    assert len(inside) == 2 and all(not (p & host_linear1) for p in inside)  # each step ran on a copy
    assert residency.blocks.max_on_device == 2  # the running block and the next one's copy
    assert residency.modulation.max_on_device == 2
    assert not residency.blocks._pending  # the copy made ahead for a next step is dropped when the loop ends


def test_blocks_alone_leave_the_modulation_linears_resident(kontext_dir):
    """The table reads the modulation linears outside any block's visit: streaming the blocks must not take them."""
    model = load(kontext_dir, "transformer=offload").transformer
    streamed = ptrs(t for u in model.residency.blocks.units for t in u.host)
    assert model.residency.modulation is None
    assert not ptrs(t for lin in model.modulation_layers() for t in lin.parameters()) & streamed
    assert ptrs(t for tensors in block_tensors(model) for t in tensors) <= streamed


def test_streamed_units_without_prefetch_beyond_the_last(kontext_dir):
    """A non-cyclic stream (the modulation layers) copies nothing ahead of its last unit."""
    lins = [torch.nn.Linear(4, 4) for _ in range(3)]
    stream = Streamed([HostTensors(lin, torch.device("cpu")) for lin in lins], torch.device("cpu"))
    for i in range(3):
        with stream.visit(i):
            assert not ptrs([lins[i].weight]) & ptrs(stream.units[i].host)
            assert torch.equal(lins[i].weight, stream.units[i].host[0])
    assert not stream._pending and stream.max_on_device == 2


def test_tied_weights_stay_one_tensor_on_the_device():
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    staged = Staged(model, torch.device("cpu"))
    assert len(staged.tensors.host) == 1
    with staged.on_device():
        assert emb.weight is head.weight and ptrs([emb.weight]) != ptrs(staged.tensors.host)
    assert emb.weight is head.weight and ptrs([emb.weight]) == ptrs(staged.tensors.host)


def test_staged_vae_and_encoders_are_on_the_device_only_for_their_stage(kontext_dir):
    pipe = load(kontext_dir, "text_encoders=staged,vae=staged")
    staged_vae = pipe.vae.staged
    host = ptrs(staged_vae.tensors.host)
    during = []
    original = pipe.vae.module.decode
    pipe.vae.module.decode = lambda z: during.append(ptrs(pipe.vae.module.parameters())) or original(z)
    pipe.edit(picture(1), "x", steps=1, seed=0, auto_resize=False)
    assert during and not (during[0] & host)  # copies while decoding
    assert ptrs(pipe.vae.module.parameters()) == host  # the host tensors again after
    assert staged_vae._users == 0
    clip, t5 = pipe.text._models
    assert isinstance(clip, Staged) and ptrs(t5.module.parameters()) == ptrs(t5.tensors.host)


def test_concurrent_runs_on_an_offloaded_pipeline_match_serial_ones(kontext_dir):
    pipe = load(kontext_dir, "offload")
    args = dict(prompt="x", width=32, height=32, steps=2, output="latent")
    want = [pipe.generate(seed=s, **args) for s in range(3)]
    got = [None] * 3

    def work(s):
        got[s] = pipe.generate(seed=s, **args)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_lora_on_an_offloaded_pipeline_matches_resident(kontext_dir, tmp_path):
    from safetensors.torch import save_file

    from tests.test_lora import diffusers_lora  # PEFT-format, on blocks 0/1 and their modulation layers

    path = tmp_path / "style.safetensors"
    save_file(diffusers_lora(torch.Generator().manual_seed(10)), str(path))
    args = dict(prompt="x", width=32, height=32, steps=2, seed=1, output="latent")
    results = []
    for placement in (None, "offload"):
        pipe = load(kontext_dir, placement)
        pipe.load_lora(path, strength=0.7)
        results.append(pipe.generate(**args))
        pipe.unload_lora()
        results.append(pipe.generate(**args))
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])
    assert not torch.equal(results[0], results[1])  # the LoRA changed the result


@pytest.mark.parametrize(
    "spec, match",
    [
        ("everything", "unknown placement"),
        ("vae=gpu", "vae must be one of"),
        ("disk=staged", "unknown part"),
        ("vae=staged,vae=resident", "given twice"),
        (3, "placement must be"),
    ],
)
def test_bad_placements_are_refused_before_any_weights(kontext_dir, spec, match, monkeypatch):
    from kontext_rt.weights.formats import CheckpointFormat

    monkeypatch.setattr(CheckpointFormat, "load_transformer", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(InputError, match=match):
        load(kontext_dir, spec)


def test_offload_refuses_compile():
    with pytest.raises(InputError, match="compiled blocks"):
        Placement(transformer="offload").check(krt.Optimizations(compile=True))
    with pytest.raises(InputError, match="CUDA graph"):
        Placement(transformer="offload").check(krt.Optimizations(cuda_graphs=True))


def test_placement_parse_round_trip():
    assert Placement.parse(None) == Placement() == Placement.parse("resident")
    assert Placement.parse("transformer=offload, vae=staged") == Placement(transformer="offload", vae="staged")
    assert Placement.parse(PRESETS["lean"]) is PRESETS["lean"]


def test_fp8_conversion_brings_one_full_precision_linear_at_a_time_to_the_device(monkeypatch):
    """convert(device=...) on a model in host memory: when each linear is quantized it is the only full-precision
    eligible linear on the device, and none stays there. The meta device stands in for the GPU (its tensors are
    told apart from the host's by their device, and quantizing on it runs the same code)."""
    from torch import nn

    from kontext_rt.config import PRESETS
    from kontext_rt.model import fp8_linear
    from kontext_rt.model.transformer import FluxTransformer

    model = FluxTransformer(PRESETS["tiny"]).to(torch.bfloat16)
    target = torch.device("meta")
    original = fp8_linear.FP8Linear.from_linear
    on_device_at_each = []

    def spy(linear, *args, **kwargs):
        full = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and fp8_linear.fp8_eligible(n)]
        on_device_at_each.append(sum(m.weight.device == target for m in full))
        assert linear.weight.device == target
        return original(linear, *args, **kwargs)

    monkeypatch.setattr(fp8_linear.FP8Linear, "from_linear", staticmethod(spy))
    names = fp8_linear.convert(model, matmul=fp8_linear.scaled_mm_dequantized, device=target)
    assert on_device_at_each == [1] * len(names) and len(names) > 0
    converted = [model.get_submodule(n) for n in names]
    assert all(m.weight.device == target and m.weight.dtype == fp8_linear.E4M3 for m in converted)
    rest = [t for n, t in model.named_parameters()]
    assert rest and all(t.device.type == "cpu" for t in rest)  # what is not quantized stays where it was


def test_fp8_conversion_parks_each_block_once_its_linears_are_quantized(monkeypatch):
    """park=...: when a linear is quantized, no other block's quantized linears are still on the device (here the
    CPU; the meta device stands in for host memory, where each block goes once done)."""
    from kontext_rt.config import PRESETS
    from kontext_rt.model import fp8_linear
    from kontext_rt.model.transformer import FluxTransformer

    model = FluxTransformer(PRESETS["tiny"]).to(torch.bfloat16)
    original = fp8_linear.FP8Linear.from_linear
    others_on_device = []

    def spy(linear, *args, **kwargs):
        converted = [(n, m) for n, m in model.named_modules() if isinstance(m, fp8_linear.FP8Linear)]
        current = {id(m) for m in linear.modules()}
        block_of = {".".join(n.split(".")[:2]) for n, m in model.named_modules() if id(m) in current}
        others_on_device.append(
            sum(m.weight.device.type == "cpu" for n, m in converted if not any(n.startswith(b + ".") for b in block_of))
        )
        return original(linear, *args, **kwargs)

    monkeypatch.setattr(fp8_linear.FP8Linear, "from_linear", staticmethod(spy))
    names = fp8_linear.convert(model, matmul=fp8_linear.scaled_mm_dequantized, park=torch.device("meta"))
    assert len(others_on_device) == len(names) and not any(others_on_device)
    blocks = [*model.double_blocks, *model.single_blocks]
    assert all(t.device.type == "meta" for b in blocks for t in (*b.parameters(), *b.buffers()))
    assert model.img_in.weight.device.type == "cpu"  # not a block: stays


def test_an_error_mid_loop_leaves_every_block_in_host_memory(kontext_dir, tmp_path):
    """A failure inside a block (an out-of-memory error, an interrupt) ends the pass: every unit holds its host
    tensors again, and the pipeline runs and takes LoRAs as one that never failed."""
    from safetensors.torch import save_file

    from tests.test_lora import diffusers_lora

    path = tmp_path / "style.safetensors"
    save_file(diffusers_lora(torch.Generator().manual_seed(10)), str(path))
    args = dict(prompt="x", width=32, height=32, steps=2, seed=1, output="latent")
    pipe = load(kontext_dir, "offload")
    model = pipe.transformer
    hosts = [ptrs(u.host) for u in model.residency.blocks.units]
    unit = model.residency.blocks.units[2]

    def out_of_memory():
        raise MemoryError("out of memory copying the next block in")

    unit.copy_to_device = out_of_memory  # fails while block 1 is being released
    with pytest.raises(MemoryError):
        pipe.generate(**args)
    del unit.copy_to_device
    assert [ptrs(t) for t in block_tensors(model)] == hosts
    assert not model.residency.blocks._pending and not model.residency.blocks._attached
    hook = model.single_blocks[0].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        pipe.generate(**args)  # an interrupt inside a block
    hook.remove()
    assert [ptrs(t) for t in block_tensors(model)] == hosts
    assert not model.residency.blocks._pending and not model.residency.blocks._attached
    pipe.load_lora(path, strength=0.7)
    fresh = load(kontext_dir, "offload")
    fresh.load_lora(path, strength=0.7)
    assert torch.equal(pipe.generate(**args), fresh.generate(**args))

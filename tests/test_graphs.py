"""The CUDA-graph cache's keys, reuse and invalidation, on the CPU: capture is replaced by a stand-in that reruns the
step eagerly into the same static output buffer, so the static-buffer plumbing is exercised exactly as a replay
would read it (a stale buffer or a graph reused for another shape shows as a wrong result)."""

import copy

import pytest
import torch

from kontext_rt import Optimizations, Pipeline
from kontext_rt.model.op_table import EAGER_OPS
from kontext_rt.sampling.denoisers import Graphed, Hoisted
from kontext_rt.sampling.graphs import StepGraphs, signature
from kontext_rt.sampling.graphs import capture_eager as eager_capture
from kontext_rt.sampling.loop import denoise
from kontext_rt.sampling.schedule import schedule
from kontext_rt.weights.formats import detect
from kontext_rt.weights.lora import LoRAStack
from tests.test_hoisting import conditioning


@pytest.fixture(scope="module")
def model(kontext_dir):
    return detect(kontext_dir).load_transformer(torch.float32, "cpu")


def test_signature_covers_every_argument():
    a = dict(x=torch.zeros(1, 4, 64), ctx=None, txt=torch.zeros(1, 3, 8))
    assert signature(a) == signature(dict(a, x=torch.ones(1, 4, 64)))  # values are not part of the key
    others = [
        dict(a, x=torch.zeros(2, 4, 64)),
        dict(a, x=torch.zeros(1, 5, 64)),
        dict(a, ctx=torch.zeros(1, 4, 64)),
        dict(a, txt=torch.zeros(1, 4, 8)),
        dict(a, txt=torch.zeros(1, 3, 8, dtype=torch.bfloat16)),
    ]
    keys = {signature(o) for o in others}
    assert len(keys) == len(others) and signature(a) not in keys


def test_cache_reuses_captures_per_bucket_and_drops_all_on_new_weights():
    graphs = StepGraphs(lambda x, y: x + y, eager_capture, max_graphs=2)
    small, big = dict(x=torch.zeros(2), y=torch.ones(2)), dict(x=torch.zeros(3), y=torch.ones(3))
    for args in (small, small, big, small):
        with graphs.session(args, version=0):
            pass
    assert graphs.captures == 2 and len(graphs) == 2
    with graphs.session(small, version=1):  # weights changed: nothing captured before may be replayed
        pass
    assert graphs.captures == 3 and graphs.keys() == [signature(small)]
    for args in (big, dict(x=torch.zeros(4), y=torch.ones(4))):
        with graphs.session(args, version=1):
            pass
    assert len(graphs) == 2 and signature(small) not in graphs.keys()  # least recently used dropped


def test_loading_another_shape_or_dtype_is_refused():
    graphs = StepGraphs(lambda x: x * 2, eager_capture)
    with graphs.session(dict(x=torch.zeros(3)), 0) as g:
        g.load(x=torch.full((3,), 2.0))
        assert torch.equal(g.replay(), torch.full((3,), 4.0))
        with pytest.raises(ValueError, match=r"captured as \(3,\) torch.float32, got \(4,\)"):
            g.load(x=torch.zeros(4))
        with pytest.raises(ValueError, match="another graph's bucket"):
            g.load(x=torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_loop_equals_plain_loop_across_buckets(model, dtype):
    m = copy.deepcopy(model).to(dtype)
    plain = Hoisted(m, EAGER_OPS, dtype)
    graphed = Graphed(m, EAGER_OPS, dtype, capture=eager_capture)
    gen = torch.Generator().manual_seed(3)
    cases = [([(2, 3), (3, 2)], 1), ([(3, 3)], 2), ([(2, 3), (3, 2)], 1)]  # edit, text-to-image, the edit again
    for grids, batch in cases:
        cond = conditioning(m.cfg, batch, 5, grids, dtype, gen)
        x = torch.randn(batch, grids[0][0] * grids[0][1], 64, generator=gen)  # new values in the same bucket
        sigmas = schedule(3, x.shape[1])
        assert torch.equal(denoise(graphed, x, sigmas, cond), denoise(plain, x, sigmas, cond))
    assert graphed.graphs.captures == 2


@pytest.mark.parametrize("first_in_inference_mode", [True, False])
def test_graphed_loop_runs_in_and_out_of_inference_mode(model, first_in_inference_mode):
    """Graph buffers made in one autograd mode are loaded in the other: a caller that times its loop under
    torch.inference_mode() and then runs a whole edit without it gets the same results, no error."""
    graphed = Graphed(model, EAGER_OPS, torch.float32, capture=eager_capture)
    gen = torch.Generator().manual_seed(5)
    cond = conditioning(model.cfg, 1, 5, [(3, 3)], torch.float32, gen)
    x, sigmas = torch.randn(1, 9, 64, generator=gen), schedule(2, 9)
    want = denoise(Hoisted(model, EAGER_OPS, torch.float32), x, sigmas, cond)
    for inference in (first_in_inference_mode, not first_in_inference_mode):
        with torch.inference_mode(inference):
            assert torch.equal(denoise(graphed, x, sigmas, cond), want)
    assert graphed.graphs.captures == 1


def test_graphs_follow_the_weights(model, tmp_path):
    from safetensors.torch import save_file

    m = copy.deepcopy(model)
    graphed = Graphed(m, EAGER_OPS, torch.float32, capture=eager_capture)
    gen = torch.Generator().manual_seed(4)
    cond = conditioning(m.cfg, 1, 5, [(3, 3)], torch.float32, gen)
    x, sigmas = torch.randn(1, 9, 64, generator=gen), schedule(2, 9)
    before = denoise(graphed, x, sigmas, cond)
    hidden = m.cfg.hidden_size
    save_file(
        {
            "double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(2, hidden, generator=gen),
            "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(3 * hidden, 2, generator=gen),
        },
        str(tmp_path / "l.safetensors"),
    )
    LoRAStack(m).load(tmp_path / "l.safetensors")
    graphed.weights_changed()
    after = denoise(graphed, x, sigmas, cond)
    assert graphed.graphs.captures == 2 and not torch.equal(after, before)
    assert torch.equal(after, denoise(Hoisted(m, EAGER_OPS, torch.float32), x, sigmas, cond))


def test_cuda_graphs_need_cuda(kontext_dir):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Pipeline.from_pretrained(kontext_dir, optimize=Optimizations(cuda_graphs=True))
    with pytest.raises(ValueError, match="needs hoist=True"):
        Optimizations(cuda_graphs=True, hoist=False).check(torch.device("cuda"), torch.bfloat16)


def _lora_file(path, hidden, seed):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    save_file(
        {
            "double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(2, hidden, generator=gen),
            "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(3 * hidden, 2, generator=gen),
        },
        str(path),
    )
    return path


def test_pipeline_lora_changes_drop_its_graphs(kontext_dir, tmp_path):
    """Pipeline.load_lora / unload_lora reach the graphed denoiser: no graph of the old weights is replayed."""
    pipe = Pipeline.from_pretrained(kontext_dir)
    plain = Pipeline.from_pretrained(kontext_dir)
    pipe.denoiser = Graphed(pipe.transformer, EAGER_OPS, torch.float32, capture=eager_capture)
    args = dict(prompt="x", width=32, height=32, steps=2, seed=3, output="latent")
    assert torch.equal(pipe.generate(**args), plain.generate(**args))
    lora = _lora_file(tmp_path / "l.safetensors", pipe.cfg.hidden_size, 7)
    pipe.load_lora(lora)
    plain.load_lora(lora)
    assert torch.equal(pipe.generate(**args), plain.generate(**args))
    pipe.unload_lora()
    plain.unload_lora()
    assert torch.equal(pipe.generate(**args), plain.generate(**args))
    assert pipe.denoiser.graphs.captures == 3


def test_a_lora_change_waits_for_the_running_loop(kontext_dir, tmp_path):
    """A LoRA loaded while another thread denoises is fused only after that loop ends: the run sees one set of
    weights throughout (the same result as with no LoRA at all)."""
    import threading

    pipe = Pipeline.from_pretrained(kontext_dir)
    args = dict(prompt="x", width=32, height=32, steps=3, seed=5, output="latent")
    want = pipe.generate(**args)
    lora = _lora_file(tmp_path / "l.safetensors", pipe.cfg.hidden_size, 8)
    started, release, result = threading.Event(), threading.Event(), {}

    def progress(done, total):
        if done == 1:
            started.set()
            assert release.wait(30)

    runner = threading.Thread(target=lambda: result.setdefault("x", pipe.generate(**args, progress=progress)))
    loader = threading.Thread(target=pipe.load_lora, args=(lora,))
    runner.start()
    assert started.wait(30)
    loader.start()
    loader.join(0.5)
    assert loader.is_alive() and pipe.loras == []  # the LoRA waits for the loop that is running
    release.set()
    runner.join(30)
    loader.join(30)
    assert torch.equal(result["x"], want) and pipe.loras == ["l"]
    assert not torch.equal(pipe.generate(**args), want)

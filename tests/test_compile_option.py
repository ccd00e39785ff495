"""Regional torch.compile (each block compiled, fullgraph) with the custom ops of both backends.

Compiled with dynamo's eager backend and with AOTAutograd (aot_eager): fullgraph=True fails on any graph break, so
this checks every custom op traces as one op (habit 4); inductor itself needs a GPU run (the compile phase of
bash benchmarks/gpu_run.sh).
"""

import pytest
import torch

from kontext_rt import Optimizations, Pipeline


@pytest.mark.parametrize("backend,compiler", [("eager", "eager"), ("eager", "aot_eager"), ("triton", "aot_eager")])
def test_compiled_blocks_give_the_uncompiled_result(kontext_dir, backend, compiler):
    torch._dynamo.reset()
    load = dict(backend=backend, max_sequence_length=8)
    args = dict(prompt="x", width=32, height=32, steps=2, seed=4, output="latent")
    plain = Pipeline.from_pretrained(kontext_dir, **load).generate(**args)
    pipe = Pipeline.from_pretrained(kontext_dir, **load, optimize=Optimizations(compile=compiler))
    assert all(
        hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None for b in pipe.transformer.double_blocks
    )
    out = pipe.generate(**args)
    assert torch.equal(out, plain)

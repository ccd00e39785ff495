"""Flash attention with QK norm + RoPE on load (kernels/rope_attention.py) against the plain-torch reference,
under TRITON_INTERPRET: every dtype, head dims 32/64/128, ragged FLUX-like layouts, strided and contiguous q/k/v."""

import pytest
import torch

from kontext_rt.kernels import reference
from kontext_rt.kernels.rope_attention import rope_attention
from tests.kernel_inputs import DTYPES, LAYOUTS, assert_close, double, norm_scales, poisoned, qkv, rope_tables


def _case(dtype, head_dim, layout, strided, seed, batch=2, heads=2):
    gen = torch.Generator().manual_seed(seed)
    text, grids = LAYOUTS[layout]
    cos, sin = rope_tables(text, grids, head_dim)
    q, k, v = qkv(batch, heads, cos.shape[0], head_dim, dtype, gen, strided)
    return q, k, v, norm_scales(head_dim, dtype, gen), norm_scales(head_dim, dtype, gen), text, cos, sin


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("layout", ["one-context", "two-contexts", "text-to-image", "no-tail"])
def test_fused_matches_reference(dtype, head_dim, layout):
    q, k, v, qs, ks, split, cos, sin = _case(dtype, head_dim, layout, strided=head_dim != 64, seed=head_dim)
    B, H, L, D = q.shape
    out = poisoned(B, L, H * D, dtype=dtype)
    assert rope_attention(q, k, v, qs, ks, split, cos, sin, out=out) is out
    truth = reference.rope_attention(*double((q, k, v)), double(qs), double(ks), split, cos, sin)
    same_dtype = reference.rope_attention(q, k, v, qs, ks, split, cos, sin)
    assert_close(out, truth, same_dtype, dtype, f"{dtype} D={D} {layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["one-context", "no-tail"])
def test_plain_attention_matches_sdpa(dtype, layout):
    """norm=False, rope=False: plain flash attention over q and k that were rotated beforehand."""
    q, k, v, *_ = _case(dtype, 64, layout, strided=True, seed=3)
    B, H, L, D = q.shape
    out = poisoned(B, L, H * D, dtype=dtype)
    rope_attention(q, k, v, norm=False, rope=False, out=out)
    truth = reference.attention(*double((q, k, v)))
    assert_close(out, truth, reference.attention(q, k, v), dtype, f"plain {dtype} {layout}")


def test_single_block_split_zero_and_batch_one():
    """A single block: one scale pair for every token (split 0), batch 1, one head."""
    q, k, v, qs, ks, _, cos, sin = _case(torch.float32, 128, "two-contexts", strided=True, seed=5, batch=1, heads=1)
    got = rope_attention(q, k, v, (qs[1], qs[1]), (ks[1], ks[1]), 0, cos, sin)
    truth = reference.rope_attention(*double((q, k, v)), double((qs[1],) * 2), double((ks[1],) * 2), 0, cos, sin)
    assert_close(
        got, truth, reference.rope_attention(q, k, v, (qs[1],) * 2, (ks[1],) * 2, 0, cos, sin), torch.float32, "split 0"
    )


def test_every_split_of_the_sequence():
    """Text/target/context boundaries need no mask: the result is the reference's for any split, not just one."""
    q, k, v, qs, ks, _, cos, sin = _case(torch.float32, 32, "one-context", strided=False, seed=7, batch=1, heads=1)
    for split in (0, 1, 30, 63, 64, 65, q.shape[2]):
        got = rope_attention(q, k, v, qs, ks, split, cos, sin)
        truth = reference.rope_attention(*double((q, k, v)), double(qs), double(ks), split, cos, sin)
        assert_close(
            got, truth, reference.rope_attention(q, k, v, qs, ks, split, cos, sin), torch.float32, f"split {split}"
        )


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(v=torch.zeros(1, 2, 9, 32, dtype=torch.bfloat16)), "v is torch.bfloat16 but the other inputs are"),
        (dict(k=torch.zeros(1, 2, 10, 32)), r"k has shape \(1, 2, 10, 32\), expected \(1, 2, 9, 32\)"),
        (dict(q=torch.zeros(2, 9, 32)), r"q must be \(B, H, L, D\)"),
        (dict(cos=torch.zeros(8, 16)), r"cos has shape \(8, 16\), expected \(9, 16\)"),
        (dict(k_scales=(torch.ones(16), torch.ones(32))), r"k_scales\[0\] has shape \(16,\), expected \(32\)"),
        (dict(out=torch.zeros(1, 9, 63)), r"out has shape \(1, 9, 63\), expected \(1, 9, 64\)"),
        (dict(out=torch.zeros(1, 9, 64, dtype=torch.float16)), "out must be a contiguous torch.float32 tensor"),
    ],
)
def test_bad_inputs_name_the_problem(change, match):
    x = torch.zeros(1, 2, 9, 32)
    args = (
        dict(
            q=x,
            k=x,
            v=x,
            q_scales=(torch.ones(32),) * 2,
            k_scales=(torch.ones(32),) * 2,
            split=0,
            cos=torch.zeros(9, 16),
            sin=torch.zeros(9, 16),
        )
        | change
    )
    with pytest.raises((ValueError, TypeError), match=match):
        rope_attention(**args)


def test_a_compiled_kernel_on_the_cpu_is_refused():
    """Outside the interpreter a CPU launch would die with '0 active drivers'; the launcher says why instead."""
    from kontext_rt.kernels import _launch

    with pytest.raises(RuntimeError, match="on the CPU they run only under the Triton interpreter"):
        _launch.check_device(object(), torch.zeros(1))


def test_gpu_configs_are_pruned_per_head_dim():
    """The autotuner tries, for each head dim, exactly the configs listed for it (tests/aot_compile.py compiles
    them for sm_90); a head dim without a list would fail loudly."""
    from kontext_rt.kernels import rope_attention as ra

    for d, wanted in ra.GPU_CONFIGS.items():
        kept = ra._prune(ra._gpu_configs(), {}, HALF=d // 2)
        assert sorted(ra._config_key(c) for c in kept) == sorted(wanted)
        assert ra._prune(ra._gpu_configs(), {"HALF": d // 2}) == kept  # as older autotuners pass it

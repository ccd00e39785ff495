"""The text-embedding cache: a hit must not run, or even load, the text encoders."""

import shutil

import pytest
import torch

from kontext_rt import Pipeline
from kontext_rt.text import TextEmbeddingCache, fingerprint


def test_disk_hit_never_loads_encoders(kontext_dir, tmp_path):
    cache = tmp_path / "cache"
    first = Pipeline.from_pretrained(kontext_dir, text_cache_dir=cache)
    a = first.generate("a red house", width=32, height=32, steps=1, seed=0, output="latent")
    assert first.text.loaded and first.text_cache.stats.misses == 1
    assert len(list(cache.glob("*.safetensors"))) == 1

    second = Pipeline.from_pretrained(kontext_dir, text_cache_dir=cache)  # a fresh process, in effect
    b = second.generate("a red house", width=32, height=32, steps=1, seed=0, output="latent")
    assert not second.text.loaded  # T5 and CLIP were never loaded
    stats = second.text_cache.stats
    assert (stats.hits, stats.disk_hits, stats.misses) == (1, 1, 0)
    assert torch.equal(a, b)


def test_memory_lru_and_stats(kontext_dir):
    pipe = Pipeline.from_pretrained(kontext_dir, text_cache_size=2)
    for p in ["one", "two", "one", "three", "two"]:  # "two" was evicted by "three"
        pipe.encode_prompt(p)
    s = pipe.text_cache.stats
    assert (s.hits, s.misses, s.disk_hits) == (1, 4, 0)


def test_cached_value_equals_fresh_encoding(kontext_dir):
    pipe = Pipeline.from_pretrained(kontext_dir)
    txt, pooled = pipe.encode_prompt("hello")
    fresh = pipe.text.encode("hello", pipe.max_sequence_length)
    assert torch.equal(txt, fresh[0]) and torch.equal(pooled, fresh[1])
    assert txt.shape == (1, 512, 48) and pooled.shape == (1, 32)


def test_key_depends_on_prompt_length_and_weights(kontext_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(kontext_dir, ckpt)
    before = fingerprint(ckpt)
    path = ckpt / "text_encoder_2" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(4 - i for i in range(4))  # change the last weight's bytes, as a fine-tune would
    path.write_bytes(bytes(data))
    assert fingerprint(ckpt) != before
    k = TextEmbeddingCache.key
    assert len({k("a", 512, before), k("b", 512, before), k("a", 256, before), k("a", 512, "other")}) == 4


def test_damaged_disk_entry_is_a_miss(tmp_path):
    cache = TextEmbeddingCache(capacity=0, folder=tmp_path)
    cache.put("k", (torch.ones(1, 2, 3), torch.ones(1, 3)), "p")
    assert cache.get("k") is not None
    (tmp_path / "k.safetensors").write_bytes(b"garbage")
    assert cache.get("k") is None and cache.stats.misses == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_negative_capacity_is_refused():
    with pytest.raises(ValueError, match="capacity"):
        TextEmbeddingCache(capacity=-1)


def test_encoders_of_another_dtype_never_read_each_others_entries(kontext_dir, tmp_path):
    """Embeddings depend on the dtype (and the hardware) the encoders ran in: a bf16 pipeline sharing the cache folder
    of a float32 one encodes its own."""
    cache = tmp_path / "cache"
    Pipeline.from_pretrained(kontext_dir, text_cache_dir=cache).encode_prompt("a red house")
    other = Pipeline.from_pretrained(kontext_dir, dtype=torch.bfloat16, text_cache_dir=cache)
    other.encode_prompt("a red house")
    assert other.text.loaded and other.text_cache.stats.misses == 1
    assert len(list(cache.glob("*.safetensors"))) == 2


@pytest.mark.filterwarnings("ignore::kontext_rt.errors.PromptTruncated")
def test_tokenizers_called_from_many_threads_with_different_settings(kontext_dir):
    """A fast tokenizer keeps its truncation and padding settings on one Rust object: calls with different lengths
    from several threads at once must neither collide ("Already borrowed") nor mix their settings up."""
    import threading

    from kontext_rt.text import TextEncoders

    enc = TextEncoders(kontext_dir, "cpu", torch.float32)
    prompts = [("make the circle red " * k).strip() for k in (1, 3, 9)]
    lengths = (8, 32, 96)
    expected = {(p, n): enc.encode(p, n)[0] for p in prompts for n in lengths}
    errors, start = [], threading.Barrier(6)

    def work(offset: int):
        try:
            start.wait()
            for i in range(40):
                p, n = prompts[(i + offset) % 3], lengths[(i // 3 + offset) % 3]
                enc.warn_if_truncated(p, n)  # warnings.catch_warnings is not thread-safe: the mark above ignores them
                assert torch.equal(enc.encode(p, n)[0], expected[(p, n)])
        except Exception as e:  # noqa: BLE001 (reported from the main thread)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[:3]

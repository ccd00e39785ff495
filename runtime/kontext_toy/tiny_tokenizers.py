"""Small tokenizers built in code, in the real formats (CLIPTokenizer files, a T5TokenizerFast tokenizer.json).

They let the demo and the tests write complete diffusers-layout checkpoints without downloading anything.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

CLIP_MAX_LENGTH = 77
_CHARS = string.ascii_letters + string.digits + string.punctuation


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table, which CLIP's BPE vocab is written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_tokenizer(folder: Path):
    """A byte-level BPE vocab (every byte, alone and word-final) with a few merges; <|endoftext|> has the top id."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n")]
    vocab_list = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CLIP_MAX_LENGTH)
    tok.save_pretrained(folder)
    return tok


def write_t5_tokenizer(folder: Path, model_max_length: int | None = None):
    """A Unigram model over characters and '▁'-prefixed characters, with pad 0, eos 1, unk 2 as in T5;
    model_max_length written to its config where given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", -100.0)]
    pieces += [("▁" + c, -2.0) for c in _CHARS] + [(c, -3.0) for c in _CHARS] + [("▁", -4.0)]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tk.save(str(folder / "tokenizer.json"))
    tok = T5TokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        **({} if model_max_length is None else {"model_max_length": model_max_length}),
    )
    tok.save_pretrained(folder)
    return tok

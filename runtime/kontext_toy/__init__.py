"""kontext_toy: the small Kontext trained here, a yardstick and a demo for kontext_rt, not the product.

- shapes: the synthetic shapes-editing task (scenes, edits, captions; train and held-out splits);
- metrics, harness, bar: how a pipeline is scored on it, and the scores the shipped model must keep;
- checkpoints: the shipped model's folder (small_kontext()), random-weight checkpoints in the diffusers layout
  (demo_checkpoint, write_diffusers_checkpoint) with tiny text encoders (tiny_text, tiny_tokenizers);
- commands: `kontext-rt demo` and `kontext-rt eval` (found by the CLI through entry points);
- training: how the shipped model was trained (python -m kontext_toy.training.train); records/ in the repository
  and README.md have every run.

It uses kontext_rt's public pieces; kontext_rt never imports it (tests/test_layers.py).
"""

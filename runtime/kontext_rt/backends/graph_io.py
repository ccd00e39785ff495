"""The input and output names of the exported graphs, declared once: export/specs.py builds each graph's I/O
contract (shapes, dtypes, profiles) under these names, the ONNX graphs and TensorRT engines carry them, and the
tensorrt backend binds its tensors by them. Plain strings here, so the runtime needs nothing from the export stage.
"""

# transformer graph: the model's forward with the context tokens appended to the target tokens
IMG = "img"  # (batch, img, in_channels): target tokens then context tokens
TXT = "txt"  # (batch, txt, context_in_dim): T5 tokens
POOLED = "pooled"  # (batch, vec_in_dim): CLIP pooled
TIMESTEPS = "timesteps"  # (batch,): sigma
GUIDANCE = "guidance"  # (batch,): only for guidance-distilled models
COS, SIN = "cos", "sin"  # (seq, head_dim/2): RoPE tables, seq = txt + img
VELOCITY = "velocity"  # output (batch, img, in_channels)
TRANSFORMER_INPUTS = (IMG, TXT, POOLED, TIMESTEPS, GUIDANCE, COS, SIN)  # in the forward's argument order

# VAE graphs: the encoder maps IMAGE to LATENT, the decoder LATENT to IMAGE
IMAGE = "image"  # (batch, 3, height, width) in [-1, 1]
LATENT = "latent"  # (batch, z, height/8, width/8), scaled and shifted

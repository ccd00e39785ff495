"""Offline build stage: ONNX, ModelOpt FP8, TensorRT engines. Imports the runtime's model; never imported by it."""

"""Turns a sentence-transformers encoder into ONNX and a Triton model repository."""

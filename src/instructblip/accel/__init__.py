"""Speed for a loaded model, kept out of the model files: `optimize` (the CPU float32 linear routes of
`cpu_linear`, applied by `from_pretrained`) and `quantize` (int8 / int4 layers for the language model, int8 for the
vision encoder, on the CPU)."""

from instructblip.accel.apply import optimize

__all__ = ["optimize"]

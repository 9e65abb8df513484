"""The CPU kernels a quantized language-model layer could use, timed at the official models' layer shapes.

For each shape of Vicuna-7B and Flan-T5-XL (attention, feed-forward, LM head) and each number of rows (1: a decoding
step; 64: a prompt), the median time of one call per kernel, alternating the kernels within each repetition:

- fp32: `F.linear` in float32 (the packed fp32 route of `accel.cpu_linear` where it is faster is within noise at
  these sizes for one row: both read the whole matrix)
- bf16: `F.linear` in bfloat16
- fbgemm-int8: `torch.ops.quantized.linear_dynamic` (int8 weights per row, activations quantized per call)
- w8a8-int_mm: the same int8 weights, activations quantized per row, `torch._int_mm` (int32 accumulation)
- w8-dequant-bf16: the int8 weights converted to bf16 on each call, then `F.linear` in bf16
- w8-bf16 / w8-fp32: `torch.ops.aten._weight_int8pack_mm` (int8 weights per row, activations in bf16 / fp32)
- w4-bf16 g32/g128: `torch.ops.aten._weight_int4pack_mm_for_cpu` (int4 weights per group, bf16 activations)
- torchao-w8 / torchao-w4: torchao's `Int8WeightOnlyConfig` and its CPU int4 layout (`PrototypeInt4WeightOnlyConfig`,
  group 128) through `quantize_` on a bf16 `nn.Linear`, eager mode (when torchao is installed)

Also the relative error of each against the fp32 output. Run: `python benchmarks/quant_kernels.py [--reps N]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = {  # name: (out_features, in_features)
    "vicuna-7b attn 4096x4096": (4096, 4096),
    "vicuna-7b mlp up 11008x4096": (11008, 4096),
    "vicuna-7b mlp down 4096x11008": (4096, 11008),
    "vicuna-7b lm_head 32001x4096": (32001, 4096),
    "flan-t5-xl attn 2048x2048": (2048, 2048),
    "flan-t5-xl mlp up 5120x2048": (5120, 2048),
    "flan-t5-xl mlp down 2048x5120": (2048, 5120),
    "flan-t5-xl lm_head 32128x2048": (32128, 2048),
}


def int4_pack(w: torch.Tensor, group: int):
    """w [N, K] -> (packed, scale_and_zero [K/group, N, 2] bf16): asymmetric int4 per group of `group` inputs."""
    n, k = w.shape
    w = F.pad(w, (0, 0, 0, -n % 16))  # the packing takes a multiple of 16 rows: zero rows, sliced off after
    n_padded = w.shape[0]
    g = w.float().reshape(n_padded, k // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-6)
    q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n_padded, k)
    zero = lo + 8 * scale  # tinygemm's convention: w = (q - 8) * scale + zero
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scale.reshape(n_padded, -1).t(), zero.reshape(n_padded, -1).t()], dim=-1)
    sz = sz.to(torch.bfloat16).contiguous()
    return packed, sz


def kernels(w: torch.Tensor):
    """name -> (fn(x_fp32) -> output) for weight w [N, K] in float32."""
    n, k = w.shape
    out = {"fp32": lambda x: F.linear(x, w)}
    wb = w.bfloat16()
    out["bf16"] = lambda x: F.linear(x.bfloat16(), wb)
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
    q8 = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qt = torch.quantize_per_channel(w, scale.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qt, None)
    out["fbgemm-int8"] = lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)
    sb, sf = scale.bfloat16(), scale.float()
    out["w8-bf16"] = lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q8, sb)
    qt8 = q8.t()

    def int_mm(x):  # activations to int8 per row, int8 x int8 -> int32 (VNNI where the CPU has it), then both scales
        xs = (x.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
        return torch._int_mm((x / xs).round().to(torch.int8), qt8) * xs * sf

    out["w8a8-int_mm"] = int_mm
    out["w8-dequant-bf16"] = lambda x: F.linear(x.bfloat16(), q8.to(torch.bfloat16)) * sb
    out["w8-fp32"] = lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, sf)
    for group in (32, 128):
        if k % group == 0:
            p4, sz = int4_pack(w, group)
            out[f"w4-bf16 g{group}"] = (lambda p, s, g: lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.bfloat16(), p, g, s)[:, :n])(p4, sz, group)
    try:
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return out
    for name, config in (("torchao-w8", Int8WeightOnlyConfig()),
                         ("torchao-w4", PrototypeInt4WeightOnlyConfig(group_size=128))):
        layer = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        layer.weight.data.copy_(wb)
        try:
            quantize_(layer, config)
        except Exception as e:  # noqa: BLE001 - report and go on: a kernel that does not run is a result too
            print(f"  {name}: {type(e).__name__}: {str(e)[:120]}")
            continue
        out[name] = (lambda m: lambda x: m(x.bfloat16()))(layer)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--only", default="", help="run only the shapes whose name contains this")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for shape_name, (n, k) in SHAPES.items():
        if args.only not in shape_name:
            continue
        w = torch.randn(n, k) * 0.02
        fns = kernels(w)
        for rows in args.rows:
            x = torch.randn(rows, k)
            ref = fns["fp32"](x)
            times = {name: [] for name in fns}
            with torch.inference_mode():
                for fn in fns.values():
                    fn(x)  # warm-up
                for _ in range(args.reps):
                    for name, fn in fns.items():
                        t = time.perf_counter()
                        fn(x)
                        times[name].append(time.perf_counter() - t)
            print(f"{shape_name}, {rows} row(s):")
            for name, fn in fns.items():
                err = ((fn(x).float() - ref).norm() / ref.norm()).item()
                med = statistics.median(times[name]) * 1e3
                print(f"  {name:16s} {med:8.2f} ms  (min {min(times[name]) * 1e3:7.2f})  rel.err {err:.4f}")


if __name__ == "__main__":
    main()

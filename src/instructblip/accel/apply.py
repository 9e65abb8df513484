"""`optimize(model)`: the CPU float32 speed routes of `cpu_linear` put into a model built from plain torch layers.

The model files use `nn.Linear` and `nn.GELU` and add their residuals themselves; this turns, in place, each
`nn.Linear` into `cpu_linear.Linear` (its class swapped: the same Parameter objects, the same state-dict keys), marks
the layers a decoding step runs (the LLaMA or OPT, T5's decoder, the LM heads) as a decoder's, which changes when
they pack their weights, and makes the GELUs between the vision encoder's and the Q-Former's fc1 and fc2 run in place.
`InstructBlipForConditionalGeneration.from_pretrained` calls it for a model loaded on the CPU in float32 (its
`optimize` keyword); a model built directly stays plain until `optimize` is called.
"""

from __future__ import annotations

import torch
from torch import nn

from instructblip.accel.cpu_linear import GELU, Linear, for_decoding
from instructblip.accel.quantize import Int4Linear, Int8Linear
from instructblip.models.llama import Llama
from instructblip.models.opt import OPT
from instructblip.models.qformer import FeedForward
from instructblip.models.t5 import T5
from instructblip.models.vision import VisionBlock


def optimize(model: nn.Module) -> nn.Module:
    """Put the fast CPU layers into `model` (an InstructBLIP network, or any part of one) in place; returns it.

    Only for a model whose floating-point weights are all float32 on the CPU: any other is returned unchanged (the
    fast routes are float32 CPU ones; a layer takes `F.linear` on any other call anyway). Calling it again does
    nothing more. `cpu_linear.unpack(model)` turns packed weights plain; the layers stay the fast ones.
    """
    if not is_cpu_float32(model):
        return model
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    for m in model.modules():
        if isinstance(m, (VisionBlock, FeedForward)) and type(m.act) is nn.GELU:
            m.act.__class__ = GELU  # its input is fc1's fresh output, read by nothing else
    for m in model.modules():
        if isinstance(m, (Llama, OPT, T5)):
            _route_tied_head(m)
    for m in model.modules():
        if isinstance(m, (Llama, OPT)):
            for_decoding(m)  # its lm_head included
        elif isinstance(m, T5):
            for_decoding(m.decoder)
            for block in m.decoder.layers:
                # the cross-attention keys and values are projected from the encoder output once per generation (a
                # prefill-sized call, never a decoding step's): this layer packs on its first call, as the encoder's do
                block.cross.kv.decoding = False
            if m.lm_head is not None:
                for_decoding(m.lm_head)
    return model


class TiedHead(Linear):
    """A tied LM head as a layer: a `Linear` over the embedding matrix's Parameter, outside the state dict (the
    checkpoint layout of a tied head has no such key), never packed (the embedding lookups read that tensor)."""

    _pack_failed = True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, *args, **kwargs):
        pass


def _route_tied_head(lm: nn.Module) -> None:
    """A tied LM head (`lm_head` None: the logits are `F.linear` over the embedding matrix, as every OPT's) becomes a
    `TiedHead`, so that its product takes the few-row routes as an untied head's does (MKL's `W @ x^T`: the tied
    head took half the time of a decoding step of BLIP-2's small OPT)."""
    if not lm.has_lm_head or lm.lm_head is not None:
        return
    weight = lm.embed_tokens.weight
    with torch.device("meta"):
        head = TiedHead(weight.shape[1], weight.shape[0], bias=False)
    head.weight = weight  # the same Parameter
    lm.lm_head = head


def is_cpu_float32(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of `model` is float32 on the CPU (and it has some), those of
    quantized layers aside (their scales may be bfloat16: they take float32 inputs all the same)."""
    tensors = [t for m in model.modules() if not isinstance(m, (Int8Linear, Int4Linear))
               for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)) if t.is_floating_point()]
    return bool(tensors) and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)

"""Convert an original LAVIS InstructBLIP or BLIP-2 checkpoint into an HF-layout directory (which we and transformers
load).

LAVIS released the trained parts only (`query_tokens`, `Qformer.bert.*`, `llm_proj`/`t5_proj`, `ln_vision`); the
vision encoder comes from EVA's own file (`eva_vit_g.pth`) and the LLM from its HF directory. The rename map is the
one of transformers' `convert_instructblip_original_to_pytorch.py` (docs/checkpoints.md#lavis-conversion):

    visual_encoder.cls_token / pos_embed / patch_embed.proj   -> vision_model.embeddings.*
    visual_encoder.blocks.{i}.norm1 / norm2 / attn.proj / mlp  -> vision_model.encoder.layers.{i}.*
    visual_encoder.blocks.{i}.attn.q_bias, v_bias              -> ...self_attn.qkv.bias = cat(q_bias, 0, v_bias)
    ln_vision                                                  -> vision_model.post_layernorm
    Qformer.bert.embeddings.LayerNorm                          -> qformer.embeddings.layernorm
    Qformer.bert.* ("attention.self" -> "attention.attention")  -> qformer.*
    llm_proj / t5_proj / opt_proj                              -> language_projection
    llm_model.* / t5_model.* / opt_model.*  (or the LLM dir's)  -> language_model.*

A checkpoint whose Q-Former has no word embeddings is BLIP-2's (`blip2_opt`, `blip2_t5`: its Q-Former reads no
text): it becomes a `Blip2Config` directory, its embeddings' LayerNorm `qformer.layernorm`; text feed-forward
networks and the first stage's retrieval heads, if the file has them, are dropped (no text reaches the Q-Former).
For OPT the eos becomes the id of "\n", where BLIP-2 ends its captions (LAVIS' `blip2_opt`).

Every source key is either used or dropped on purpose with a reason (returned in the report); anything else is an
error, so nothing is lost silently. `.pth` files are read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from instructblip.files import write_json
from instructblip.models.config import Blip2Config, InstructBlipConfig, text_config_from_dict
from instructblip.weights.checkpoint import CheckpointError, _parse_size, _Reader

# EVA-CLIP-g has 40 blocks; BLIP-2 / InstructBLIP use the first 39 (penultimate-layer features)
VISION_LAYERS = 39
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "spiece.model")


@dataclass
class ConversionReport:
    used: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why

    def summary(self) -> str:
        lines = [f"{len(self.used)} source tensors used, {len(self.dropped)} dropped on purpose"]
        reasons: dict[str, int] = {}
        for why in self.dropped.values():
            reasons[why] = reasons.get(why, 0) + 1
        lines += [f"  dropped {n}: {why}" for why, n in sorted(reasons.items())]
        return "\n".join(lines)


def load_pth(path: str | os.PathLike) -> dict[str, Tensor]:
    """A LAVIS/EVA `.pth` state dict, weights only (no arbitrary unpickling). `{"model": sd}` is unwrapped."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path} could not be read as a weights-only PyTorch file: {e}") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return data


# ----------------------------------------------------------------------------------------------------------------------
# Pure renames: source state dicts -> HF keys (values are zero-argument loaders, so big LLMs are read lazily)

Loader = Callable[[], Tensor]


def _vision(vision: dict[str, Tensor], image_size: int, layers: int, report: ConversionReport) -> dict[str, Loader]:
    """EVA ViT-g keys (bare, `visual_encoder.` or `visual.` prefixed) -> `vision_model.*`."""
    out: dict[str, Loader] = {}
    prefix = next((p for p in ("visual_encoder.", "visual.", "") if f"{p}cls_token" in vision), None)
    if prefix is None:
        raise CheckpointError("the vision weights lack cls_token: is this an EVA ViT-g checkpoint (eva_vit_g.pth)?")
    renames = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
               "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    block = re.compile(rf"^{re.escape(prefix)}blocks\.(\d+)\.(.+)\.(weight|bias)$")
    for key, tensor in vision.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name == "cls_token":
            out["vision_model.embeddings.class_embedding"] = lambda t=tensor: t
        elif name == "pos_embed":
            patch = vision[f"{prefix}patch_embed.proj.weight"].shape[-1]
            out["vision_model.embeddings.position_embedding"] = (
                lambda t=tensor, p=patch: _resize_pos_embed(t, image_size, p)
            )
        elif name.startswith("patch_embed.proj."):
            out[f"vision_model.embeddings.patch_embedding.{name.rsplit('.', 1)[1]}"] = lambda t=tensor: t
        elif m := re.match(r"^blocks\.(\d+)\.attn\.(q_bias|v_bias)$", name):
            i = int(m.group(1))
            if i >= layers:
                report.dropped[key] = f"EVA block >= {layers} (InstructBLIP uses the first {layers})"
                continue
            if m.group(2) == "q_bias":
                v_key = f"{prefix}blocks.{i}.attn.v_bias"
                if v_key not in vision:
                    raise CheckpointError(f"the vision weights have {key} but not {v_key}")
                out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = (
                    lambda q=tensor, v=vision[v_key]: torch.cat([q, torch.zeros_like(v), v])
                )
                report.used.append(v_key)
        elif (m := block.match(key)) and m.group(2) in renames:
            i = int(m.group(1))
            if i >= layers:
                report.dropped[key] = f"EVA block >= {layers} (InstructBLIP uses the first {layers})"
                continue
            out[f"vision_model.encoder.layers.{i}.{renames[m.group(2)]}.{m.group(3)}"] = lambda t=tensor: t
        elif name.startswith(("norm.", "fc_norm.", "head.")) or name == "rope.freqs_cos":
            report.dropped[key] = "EVA classification head / final norm (InstructBLIP uses ln_vision instead)"
            continue
        else:
            continue  # reported as unknown by the caller
        report.used.append(key)
    return out


def _resize_pos_embed(pos: Tensor, image_size: int, patch_size: int) -> Tensor:
    """Bicubically resize the patch grid of EVA's position embedding to `image_size` (LAVIS interpolate_pos_embed)."""
    side = image_size // patch_size
    n = pos.shape[1] - 1
    old = int(n**0.5)
    if old == side:
        return pos
    D = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, old, old, D).permute(0, 3, 1, 2).float()  # (1, D, old, old)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, side * side, D).to(pos.dtype)  # (1, side*side, D)
    return torch.cat([pos[:, :1], grid], dim=1)


def _qformer_and_projection(lavis: dict[str, Tensor], report: ConversionReport, blip2: bool) -> dict[str, Loader]:
    out: dict[str, Loader] = {}
    for key, tensor in lavis.items():
        if key == "query_tokens":
            new = key
        elif key == "ln_vision.weight" or key == "ln_vision.bias":
            new = "vision_model.post_layernorm." + key.rsplit(".", 1)[1]
        elif key == "Qformer.bert.embeddings.position_ids":
            report.dropped[key] = "buffer (positions are computed)"
            continue
        elif key.startswith("Qformer.bert.embeddings.LayerNorm."):
            where = "qformer.layernorm." if blip2 else "qformer.embeddings.layernorm."
            new = where + key.rsplit(".", 1)[1]
        elif blip2 and re.match(r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.", key):
            report.dropped[key] = "the Q-Former's text feed-forward (BLIP-2 feeds it no text)"
            continue
        elif blip2 and key.startswith(("Qformer.cls.", "vision_proj.", "text_proj.", "itm_head.")) or key == "temp":
            report.dropped[key] = "the first stage's retrieval / matching heads (not used for generation)"
            continue
        elif key.startswith("Qformer.bert."):
            new = "qformer." + key[len("Qformer.bert."):]
            if "attention.self" in new:
                new = new.replace("attention.self", "attention.attention")
        elif key.startswith(("llm_proj.", "t5_proj.", "opt_proj.")):
            new = "language_projection." + key.split(".", 1)[1]
        else:
            continue
        out[new] = lambda t=tensor: t
        report.used.append(key)
    return out


def _llm_from_lavis(lavis: dict[str, Tensor], report: ConversionReport) -> dict[str, Loader]:
    """An untrimmed LAVIS checkpoint also holds the LLM (`llm_model.*` / `t5_model.*`)."""
    out: dict[str, Loader] = {}
    for key, tensor in lavis.items():
        for prefix in ("llm_model.", "t5_model.", "opt_model."):
            if key.startswith(prefix):
                name = key[len(prefix):]
                if re.fullmatch(r"(encoder|decoder)\.embed_tokens\.weight", name):
                    report.dropped[key] = "alias of shared.weight"
                    break
                out["language_model." + name] = lambda t=tensor: t
                report.used.append(key)
    return out


def _llm_from_dir(llm_dir: str, report: ConversionReport, opt: bool = False) -> dict[str, Loader]:
    reader = _Reader(llm_dir)
    out: dict[str, Loader] = {}
    for key in reader.where:
        name = "model." + key if opt and key.startswith("decoder.") else key  # facebook/opt-* files: `decoder.*`
        if not opt and re.fullmatch(r"(encoder|decoder)\.embed_tokens\.weight", key):
            report.dropped[f"{llm_dir}:{key}"] = "alias of shared.weight"
            continue
        if key.endswith("rotary_emb.inv_freq"):
            report.dropped[f"{llm_dir}:{key}"] = "buffer (rotary frequencies are computed)"
            continue

        def load(k=key):
            t = torch.empty(reader.shape(k), dtype=reader.dtype(k))
            reader.read_into(k, t)
            return t

        out["language_model." + name] = load
        report.used.append(f"{llm_dir}:{key}")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The whole conversion


def convert_lavis(
    lavis_checkpoint: str | os.PathLike,
    vision: str | os.PathLike | None,
    llm: str | os.PathLike,
    out: str | os.PathLike,
    image_size: int = 224,
    qformer_tokenizer: str | os.PathLike | None = None,
    max_shard_size: str = "5GB",
    vision_layers: int = VISION_LAYERS,
    vision_heads: int = 16,
    qformer_heads: int = 12,
) -> ConversionReport:
    """Write an HF-layout InstructBLIP (or BLIP-2: a Q-Former without word embeddings) directory to `out`. Returns
    what was used and what was dropped.

    Widths and depths are read from the tensors; head counts cannot be, so they are arguments (EVA ViT-g: 16,
    BERT-base Q-Former: 12). `vision_layers`: how many EVA blocks to keep (39 for InstructBLIP and BLIP-2)."""
    report = ConversionReport()
    lavis = load_pth(lavis_checkpoint)
    blip2 = "Qformer.bert.embeddings.word_embeddings.weight" not in lavis
    llm = os.fspath(llm)
    llm_config_path = os.path.join(llm, "config.json")
    if not os.path.isfile(llm_config_path):
        raise CheckpointError(f"--llm {llm} must be the LLM's HF directory (config.json + weights); no config.json")
    with open(llm_config_path, encoding="utf-8") as f:
        text = text_config_from_dict(json.load(f))

    vision_source = {k: v for k, v in lavis.items() if k.startswith("visual_encoder.")}
    if vision is not None:
        vision_source = load_pth(vision)
    if not vision_source:
        raise CheckpointError(f"{lavis_checkpoint} holds no vision encoder; pass --vision eva_vit_g.pth")
    tensors = _vision(vision_source, image_size, vision_layers, report)
    tensors |= _qformer_and_projection(lavis, report, blip2)
    llm_tensors = _llm_from_lavis(lavis, report)
    if vision is not None:
        unknown = [k for k in vision_source if k not in report.used and k not in report.dropped]
        if unknown:
            raise CheckpointError(f"{vision}: {len(unknown)} key(s) this converter does not know, e.g. {unknown[0]}")
    unknown = [k for k in lavis if k not in report.used and k not in report.dropped]
    if unknown:
        raise CheckpointError(
            f"{lavis_checkpoint}: {len(unknown)} key(s) this converter does not know, e.g. {unknown[0]}"
        )
    tensors |= llm_tensors or _llm_from_dir(llm, report, opt=text.model_type == "opt")
    if text.model_type == "opt" and text.tie_word_embeddings and "language_model.lm_head.weight" in tensors:
        del tensors["language_model.lm_head.weight"]  # OPT's head is its embedding matrix
        report.dropped["language_model.lm_head.weight"] = "OPT's LM head, tied to the token embeddings"
    needed = ["query_tokens", "language_projection.weight"]
    needed.append("qformer.layernorm.weight" if blip2 else "qformer.embeddings.word_embeddings.weight")
    for key in needed:
        if key not in tensors:
            raise CheckpointError(f"{lavis_checkpoint} lacks the weights for {key}: is it an InstructBLIP or BLIP-2 "
                                  "checkpoint?")

    # sizes from the tensors themselves
    q_width = lavis["query_tokens"].shape[-1]
    q_vocab = 30522 if blip2 else lavis["Qformer.bert.embeddings.word_embeddings.weight"].shape[0]
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.", k))}
    cross_key = re.compile(r"qformer\.encoder\.layer\.(\d+)\.crossattention\.")
    cross = sorted({int(m.group(1)) for k in tensors if (m := cross_key.match(k))})
    if text.model_type == "t5" and text.feed_forward_proj == "gated-gelu":
        text.dense_act_fn = "gelu"  # LAVIS runs Flan-T5 with the exact GELU
    if text.model_type == "t5":  # LAVIS/Flan-T5: untied, unscaled head
        text.tie_word_embeddings = "language_model.lm_head.weight" not in tensors
        text.scale_decoder_outputs = text.tie_word_embeddings
    vision_width = tensors["vision_model.embeddings.class_embedding"]().shape[-1]
    patch = tensors["vision_model.embeddings.patch_embedding.weight"]().shape[-1]
    kept = {int(m.group(1)) for k in tensors if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}
    if len(kept) != vision_layers:
        raise CheckpointError(f"the vision weights have {len(kept)} blocks; {vision_layers} were asked for")
    if text.model_type == "opt":
        newline = _newline_id(llm)
        if newline is not None:
            text.eos_token_id = newline
    positions = 512 if blip2 else tensors["qformer.embeddings.position_embeddings.weight"]().shape[0]
    ffn = "intermediate_query" if blip2 else "intermediate"
    config = (Blip2Config if blip2 else InstructBlipConfig)(
        vision_config=dict(image_size=image_size, patch_size=patch, hidden_size=vision_width,
                           num_attention_heads=vision_heads, num_hidden_layers=vision_layers,
                           intermediate_size=tensors["vision_model.encoder.layers.0.mlp.fc1.weight"]().shape[0]),
        qformer_config=dict(vocab_size=q_vocab, hidden_size=q_width, num_hidden_layers=len(layers),
                            num_attention_heads=qformer_heads,
                            intermediate_size=tensors[f"qformer.encoder.layer.0.{ffn}.dense.weight"]().shape[0],
                            max_position_embeddings=positions,
                            cross_attention_frequency=cross[1] - cross[0] if len(cross) > 1 else 2),
        text_config=text.to_dict(),
        num_query_tokens=lavis["query_tokens"].shape[1],
        image_token_index=None,  # LAVIS prepends the image features (the legacy scheme)
    )
    _write(tensors, config, out, _parse_size(max_shard_size))
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(llm, name)):
            shutil.copy(os.path.join(llm, name), os.path.join(out, name))
    if qformer_tokenizer is not None and not blip2:
        shutil.copytree(qformer_tokenizer, os.path.join(out, "qformer_tokenizer"), dirs_exist_ok=True)
    return report


def _newline_id(llm_dir: str) -> int | None:
    """The id of "\n" in the LLM directory's tokenizer (None without a tokenizer there)."""
    from instructblip.processing.tokenizers import Tokenizer

    try:
        ids = Tokenizer.from_pretrained(llm_dir).encode("\n", add_special_tokens=False)
    except (OSError, ValueError):
        return None
    ids = ids.ids if hasattr(ids, "ids") else ids
    return int(ids[-1]) if ids else None


def _write(tensors: dict[str, Loader], config: InstructBlipConfig, out: str | os.PathLike, limit: int) -> None:
    """Shards of at most `limit` bytes, each materialised alone, written under a temporary name and renamed into
    place once all are complete; config.json last."""
    from safetensors.torch import save_file

    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    written: list[tuple[str, list[str]]] = []  # (temporary file, its keys)
    shard: dict[str, Tensor] = {}
    size = 0

    def flush() -> None:
        tmp = os.path.join(out, f".shard-{len(written) + 1}.tmp")
        save_file({k: v.contiguous() for k, v in shard.items()}, tmp, metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        shard.clear()

    for key in sorted(tensors):
        tensor = tensors[key]()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > limit:
            flush()
            size = 0
        shard[key] = tensor
        size += nbytes
    flush()
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(out, "model.safetensors"))
    else:
        names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
        for (tmp, _), name in zip(written, names, strict=True):
            os.replace(tmp, os.path.join(out, name))
        weight_map = {k: name for (_, keys), name in zip(written, names, strict=True) for k in keys}
        write_json(os.path.join(out, "model.safetensors.index.json"), {"metadata": {}, "weight_map": weight_map})
    config.save_pretrained(out)

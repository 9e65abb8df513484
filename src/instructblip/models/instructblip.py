"""The composite InstructBLIP: vision encoder -> instruction-aware Q-Former -> projection -> language model.

The same network serves the family, as its config says:
- BLIP-2 (`Blip2Config`): the Q-Former reads the learned queries alone, no instruction; OPT or Flan-T5.
- Video (InstructBLIP-Video, transformers' semantics): `pixel_values` (B, T, 3, H, W) put every frame through the
  vision encoder and the Q-Former (with the sample's instruction), and the T x Q query outputs of a sample are
  concatenated in frame order: (B, T * Q, D). Any of the family's checkpoints reads videos that way.

Image features enter the language model in one of two ways, chosen by `config.image_token_index`:
- set (transformers >= 4.45 / 5.x checkpoints): the processor writes `num_query_tokens` `<image>` ids into the
  prompt and their embeddings are replaced, in order, by the projected query outputs;
- None (2023 checkpoints, LAVIS): the features are prepended to the prompt embeddings, the mask extended with ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instructblip.models.config import InstructBlipConfig
from instructblip.models.llama import Llama
from instructblip.models.opt import OPT
from instructblip.models.outputs import EncoderOutput, ImageFeaturesOutput, InstructBlipOutput
from instructblip.models.qformer import Blip2QFormerModel, InstructBlipQFormerModel
from instructblip.models.t5 import T5
from instructblip.models.vision import InstructBlipVisionModel

IGNORE_INDEX = -100
LANGUAGE_MODELS = {"llama": Llama, "t5": T5, "opt": OPT}


class InstructBlipNetwork(nn.Module):
    """The network: vision encoder, query tokens, Q-Former, projection and language model, with `forward` (logits and
    loss, or the last hidden state without an LM head). Loading, saving, generation and ranking are added by the
    public classes in `instructblip.modeling`, which subclass this one.

    `image_embeds` (the vision encoder's output) may be passed to `get_image_features` and `forward` instead of
    `pixel_values`: the callers that cache vision features (`generation.features.VisionCache`) do so.
    """

    main_input_name = "pixel_values"
    has_lm_head = True

    def __init__(self, config: InstructBlipConfig):
        super().__init__()
        self.config = config
        self.vision_model = InstructBlipVisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        qformer = InstructBlipQFormerModel if config.reads_instruction else Blip2QFormerModel
        self.qformer = qformer(config.qformer_config)
        text = config.text_config
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, text.hidden_size)
        self.language_model: Llama | T5 | OPT = LANGUAGE_MODELS[text.model_type](text, lm_head=self.has_lm_head)
        self.quantized: str | None = None  # the language model's quantization ("int8", "int4"), set by accel.quantize
        self.quantized_vision: str | None = None  # the vision encoder's ("int8")

    # ---- small conveniences ----

    @property
    def dtype(self) -> torch.dtype:
        return self.language_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_projection.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def gradient_checkpointing_enable(self, vision: bool = True, qformer: bool = True, language_model: bool = True):
        """Recompute activations in the backward pass, per sub-model."""
        self.vision_model.gradient_checkpointing = vision
        self.qformer.gradient_checkpointing = qformer
        if isinstance(self.language_model, T5):
            self.language_model.encoder.gradient_checkpointing = language_model
            self.language_model.decoder.gradient_checkpointing = language_model
        else:
            self.language_model.gradient_checkpointing = language_model

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing_enable(False, False, False)

    # ---- the three steps ----

    def get_image_features(
        self,
        pixel_values: Tensor | None = None,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        vision_outputs: EncoderOutput | None = None,
        **_: object,
    ) -> ImageFeaturesOutput:
        """Steps 1-3: image -> vision features -> Q-Former (queries + instruction) -> projected query outputs
        (B, num_query_tokens, text hidden size) in `pooler_output`. `vision_outputs`: the vision encoder's output
        for these images, computed earlier (a cache); then `pixel_values` is read for its shape only.

        Videos, `pixel_values` (B, T, 3, H, W): every frame goes through both steps with its sample's instruction and
        the features are (B, T * num_query_tokens, D), frame after frame; the vision and Q-Former outputs stay per
        frame (B * T, ...), and `vision_outputs` must then be those of the B * T frames. BLIP-2's Q-Former reads no
        instruction: `qformer_input_ids` are ignored."""
        frames = None
        if pixel_values is not None and pixel_values.dim() == 5:
            B, frames = pixel_values.shape[:2]
            pixel_values = pixel_values.flatten(0, 1)  # (B * T, 3, H, W)
            if qformer_input_ids is not None:
                qformer_input_ids = qformer_input_ids.repeat_interleave(frames, 0)  # (B * T, L_q)
                if qformer_attention_mask is not None:
                    qformer_attention_mask = qformer_attention_mask.repeat_interleave(frames, 0)
        if vision_outputs is not None:
            vision = vision_outputs
        else:
            vision = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                       output_hidden_states=output_hidden_states)
        # each step's inputs go to the device of the part that reads them (a no-op unless a device_map splits it)
        device = next(self.qformer.parameters()).device
        image_embeds = vision.last_hidden_state.to(device)  # (N, 1 + patches, D_vision), N images or frames
        N = image_embeds.shape[0]
        queries = self.query_tokens.to(device).expand(N, -1, -1)  # (N, Q, D_qformer)
        if self.config.reads_instruction:
            mask = None
            if qformer_input_ids is not None:
                if qformer_input_ids.shape[0] != N:
                    raise ValueError(f"{N} images but {qformer_input_ids.shape[0]} Q-Former instructions; pass one "
                                     "instruction per image")
                qformer_input_ids = qformer_input_ids.to(device)
                if qformer_attention_mask is not None:
                    qformer_attention_mask = qformer_attention_mask.to(device)
                    ones = torch.ones(N, queries.shape[1], dtype=qformer_attention_mask.dtype, device=device)
                    mask = torch.cat([ones, qformer_attention_mask], dim=1)  # (N, Q + T): every query is valid
            qformer = self.qformer(
                input_ids=qformer_input_ids,
                attention_mask=mask,
                query_embeds=queries,
                encoder_hidden_states=image_embeds,
                output_hidden_states=output_hidden_states,
            )
        else:  # BLIP-2: the queries alone
            qformer = self.qformer(queries, encoder_hidden_states=image_embeds,
                                   output_hidden_states=output_hidden_states)
        query_output = qformer.last_hidden_state[:, : queries.shape[1]]  # (N, Q, D_qformer)
        weight = self.language_projection.weight
        features = self.language_projection(query_output.to(weight.device, weight.dtype))
        if frames is not None:
            features = features.reshape(N // frames, frames * features.shape[1], -1)  # (B, T * Q, D): frame order
        return ImageFeaturesOutput(pooler_output=features, vision_outputs=vision, qformer_outputs=qformer)

    def get_video_features(self, pixel_values: Tensor, qformer_input_ids: Tensor | None = None,
                           qformer_attention_mask: Tensor | None = None, interpolate_pos_encoding: bool = False,
                           **kwargs: object) -> ImageFeaturesOutput:
        """transformers' name for the video case of `get_image_features`: `pixel_values` (B, T, 3, H, W) ->
        `pooler_output` (B, T * num_query_tokens, D)."""
        if pixel_values.dim() != 5:
            raise ValueError(f"video pixel_values must have shape (batch, frames, 3, height, width), got "
                             f"{tuple(pixel_values.shape)}")
        return self.get_image_features(pixel_values, qformer_input_ids, qformer_attention_mask,
                                       interpolate_pos_encoding, **kwargs)

    def merge_image_features(
        self,
        image_features: Tensor,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Put the image features (B, Q, D) into the prompt embeddings. Returns (inputs_embeds, attention_mask)."""
        device = self.get_input_embeddings().weight.device  # the language model's (it may differ from the vision's)
        if input_ids is not None:
            input_ids = input_ids.to(device)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (the tokenized prompt) or inputs_embeds")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        inputs_embeds = inputs_embeds.to(device)
        B, L, _ = inputs_embeds.shape
        if image_features.shape[0] != B:
            raise ValueError(f"{image_features.shape[0]} images but {B} prompts; pass one prompt per image")
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.long, device=device)
        attention_mask = attention_mask.to(device)
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        token = self.config.image_token_index
        if token is None:  # legacy: prepend
            ones = torch.ones(B, image_features.shape[1], dtype=attention_mask.dtype, device=attention_mask.device)
            return torch.cat([image_features, inputs_embeds], 1), torch.cat([ones, attention_mask], 1)  # (B, Q + L, D)
        if input_ids is not None:
            where = input_ids == token  # (B, L)
        else:  # find the rows that hold the <image> embedding
            image_embedding = self.get_input_embeddings().weight[token].to(inputs_embeds.dtype)
            where = (inputs_embeds == image_embedding).all(-1)
        counts = where.sum(1)
        Q = image_features.shape[1]
        if not bool((counts == Q).all()):
            raise ValueError(
                f"each prompt must hold exactly {Q} image tokens (id {token}); found {counts.tolist()}. "
                "Build the inputs with InstructBlipProcessor, which inserts them"
            )
        return inputs_embeds.masked_scatter(where[..., None], image_features), attention_mask

    def forward(
        self,
        pixel_values: Tensor | None = None,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        image_features: Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        output_hidden_states: bool = False,
        **_: object,
    ) -> InstructBlipOutput:
        """Logits (and the loss, given `labels`) for a batch; the semantics of transformers 5.x.

        `labels`: decoder-only models: the full input length with IGNORE_INDEX (-100) where no loss is wanted (image,
        prompt and pad positions; see `build_labels`); in the legacy prepend scheme, labels of the text length are also
        accepted. T5: the decoder targets; `decoder_input_ids` default to them shifted right.
        `image_features`: precomputed `get_image_features(...).pooler_output`, to skip the vision and Q-Former steps.
        """
        vision_out = qformer_out = None
        if mm_encoder_outputs is not None:
            given = mm_encoder_outputs.get("image") or mm_encoder_outputs.get("video")
            if given is not None:
                image_features = given.pooler_output
        if image_features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values (or precomputed image_features)")
            feats = self.get_image_features(pixel_values, qformer_input_ids, qformer_attention_mask,
                                            interpolate_pos_encoding, output_hidden_states)
            image_features, vision_out, qformer_out = feats.pooler_output, feats.vision_outputs, feats.qformer_outputs
        elif pixel_values is not None:
            raise ValueError("pass either pixel_values or precomputed image features, not both")
        embeds, mask = self.merge_image_features(image_features, input_ids, attention_mask, inputs_embeds)
        lm = self.language_model
        out = InstructBlipOutput(vision_outputs=vision_out, qformer_outputs=qformer_out)
        if isinstance(lm, T5):
            encoder_hidden = lm.encode(embeds, mask)
            if decoder_input_ids is None:
                if labels is None:
                    raise ValueError("a T5 model needs decoder_input_ids or labels")
                decoder_input_ids = lm.shift_right(labels)
            decoder_input_ids = decoder_input_ids.to(embeds.device)
            if decoder_attention_mask is not None:
                decoder_attention_mask = decoder_attention_mask.to(embeds.device)
            hidden = lm.decode(decoder_input_ids, encoder_hidden, mask, decoder_attention_mask)
            out.encoder_last_hidden_state = encoder_hidden
        else:
            hidden = lm(embeds, mask)
        if not self.has_lm_head:
            out.last_hidden_state = hidden
            return out
        logits = lm.logits(hidden)
        out.logits = logits
        if labels is not None:
            out.loss = self._loss(logits, labels, is_t5=isinstance(lm, T5))
        return out

    def _loss(self, logits: Tensor, labels: Tensor, is_t5: bool) -> Tensor:
        labels = labels.to(logits.device)
        if not is_t5:
            L = logits.shape[1]
            if labels.shape[1] < L and not self.config.reads_instruction:
                # BLIP-2 (transformers): labels cover the last positions of the input; the logits are cut to them
                logits = logits[:, L - labels.shape[1]:]
                L = labels.shape[1]
            elif labels.shape[1] == L - self.config.num_query_tokens and self.config.image_token_index is None:
                labels = F.pad(labels, (self.config.num_query_tokens, 0), value=IGNORE_INDEX)  # text-only labels
            if labels.shape[1] != L:
                raise ValueError(f"labels have length {labels.shape[1]}; the model input has {L} positions")
            labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # position t predicts token t + 1
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def build_labels(input_ids: Tensor, attention_mask: Tensor | None = None, prompt_lengths: Tensor | None = None,
                 image_token_id: int | None = None) -> Tensor:
    """Training labels from input ids: IGNORE_INDEX at padding, at `<image>` tokens and at the first
    `prompt_lengths[b]` real tokens of each row (the prompt); the rest (the answer) is learned.

    Works for left or right padding. For T5, pass the decoder targets and their mask, without prompt lengths.
    """
    labels = input_ids.clone()
    ignore = torch.zeros_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        ignore |= attention_mask == 0
    if image_token_id is not None:
        ignore |= input_ids == image_token_id
    if prompt_lengths is not None:
        real = (~ignore).long().cumsum(1)  # 1-based index among real, non-image tokens
        ignore |= real <= torch.as_tensor(prompt_lengths, device=input_ids.device)[:, None]
    return labels.masked_fill(ignore, IGNORE_INDEX)

"""MM1Model: images -> ViT -> connector -> spliced into the token embeddings -> decoder.

Shapes: B sequences, S tokens each, I images in the micro-batch (sequence 0's first), P patches
per image, W ViT width, V image tokens per image (connector ``num_tokens``), D decoder width.

Pipeline placement: the first stage (``pre_process``) holds the ViT, the connector and the
decoder's embedding; every stage holds its decoder layers (``build_decoder``), the last one the
final norm and output layer. Stages after the first get their input from Megatron's schedule
(``set_input_tensor``), as a plain GPTModel does.

Splicing contract (``mm1_moe.data.batch.PackedBatch``): each image owns V consecutive
``image_token_id`` placeholders; their embedding rows are replaced by the image's V connector
outputs, images in order (sequence 0's first). A per-sequence placeholder count other than
V x (images of that sequence) raises ValueError naming the sequence; it is never shifted.

Checkpoint names (``sharded_state_dict``): the decoder's tensors keep a GPTModel's names
(``embedding.``, ``decoder.``, ``output_layer.``), so decoder checkpoints and the Llama/Mixtral
converters apply unchanged; the encoder is under ``vision_model.``, the connector under
``connector.``.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default

from ..config import Config
from .connector import build_connector
from .decoder import build_decoder
from .vision import VisionTransformer, vision_transformer_config


class MM1Model(MegatronModule):
    """This pipeline stage's part of MM1 (see the module docstring).

    Args:
        config: the mm1_moe config (model.vision / connector / decoder, parallel, train).
        transformer_config: the decoder's Megatron config (``decoder_transformer_config``);
            the ViT's is derived from ``config`` with the same ``use_cpu_initialization``.
        pre_process / post_process: first / last pipeline stage (virtual stage aware).
        pp_rank, vp_stage: this chunk's pipeline rank and virtual stage, for the decoder split.
        image_token_id: the placeholder token id (keyword-only).
    """

    def __init__(self, config: Config, transformer_config: TransformerConfig,
                 pre_process: bool = True, post_process: bool = True, pp_rank: int = 0,
                 vp_stage: Optional[int] = None, *, image_token_id: int):
        super().__init__(config=transformer_config)
        m = config.model
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.image_token_id = int(image_token_id)
        self.tokens_per_image = m.connector.num_tokens
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads
        self.vision_model: Optional[VisionTransformer] = None
        self.connector: Optional[torch.nn.Module] = None
        if pre_process:
            vit_config = vision_transformer_config(config, transformer_config.use_cpu_initialization)
            self.vision_model = VisionTransformer(config, vit_config)
            self.connector = build_connector(m.connector, m.vision.width, m.decoder.hidden_size,
                                             num_patches=m.vision.num_patches,
                                             num_heads=m.vision.num_heads,
                                             dtype=transformer_config.params_dtype)
        # The embedding returns the full [S, B, D] under sequence parallelism: image rows are
        # spliced in over the whole sequence, and ``embed`` scatters afterwards.
        self.language_model = build_decoder(config, transformer_config, pre_process, post_process,
                                            pp_rank, vp_stage,
                                            scatter_embedding_sequence_parallel=False)
        self._freeze(config)

    def _freeze(self, config: Config) -> None:
        """requires_grad=False on the parts the config freezes (vision, connector, decoder)."""
        m = config.model
        parts = [(self.vision_model, m.vision.freeze), (self.connector, m.connector.freeze),
                 (self.language_model, m.decoder.freeze)]
        for module, frozen in parts:
            if module is not None and frozen:
                module.requires_grad_(False)

    # -------------------------------------------------------------- Megatron interface
    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's schedules hand the previous stage's activations here."""
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The decoder under GPTModel's own names; ``vision_model.`` and ``connector.``."""
        out = self.language_model.sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.pre_process:
            out.update(self.vision_model.sharded_state_dict(f"{prefix}vision_model.",
                                                            sharded_offsets, metadata))
            out.update(sharded_state_dict_default(self.connector, f"{prefix}connector.",
                                                  sharded_offsets, metadata))
        return out

    _OWN_PARTS = ("vision_model.", "connector.")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts what ``sharded_state_dict`` names (a checkpoint: the decoder under GPTModel's
        own names) as well as ``state_dict()``'s (``language_model.``-prefixed) keys."""
        mapped = {}
        for key, value in state_dict.items():
            plain = key.startswith(self._OWN_PARTS) or key.startswith("language_model.")
            mapped[key if plain else f"language_model.{key}"] = value
        return super().load_state_dict(mapped, strict=strict, assign=assign)

    # -------------------------------------------------------------- image path
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """ViT only: [I, 3, H, H] -> [I, P, W] (first stage)."""
        return self.vision_model(images)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Connector only: [I, P, W] -> [I, V, D] (first stage)."""
        return self.connector(features)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[I, 3, H, H] -> [I, V, D]."""
        return self.project(self.encode_images(images))

    def _check_placeholders(self, is_image_BS: torch.Tensor, num_images: int,
                            images_per_sequence: Optional[torch.Tensor]) -> None:
        """ValueError naming the first sequence whose placeholders disagree with its images."""
        B = is_image_BS.shape[0]
        if images_per_sequence is None:
            if num_images and B > 1:
                raise ValueError(f"{num_images} images for {B} sequences need images_per_sequence")
            images_per_sequence = torch.full((B,), num_images, dtype=torch.long)
        per_seq = images_per_sequence.to(is_image_BS.device, torch.long).reshape(-1)
        if per_seq.numel() != B:
            raise ValueError(f"images_per_sequence has {per_seq.numel()} entries for {B} sequences")
        if int(per_seq.sum()) != num_images:
            raise ValueError(f"images_per_sequence sums to {int(per_seq.sum())} but "
                             f"{num_images} images are attached")
        counts = is_image_BS.sum(1)
        expected = per_seq * self.tokens_per_image
        if torch.equal(counts, expected):
            return
        b = int((counts != expected).nonzero()[0])
        raise ValueError(f"sequence {b}: {int(counts[b])} image placeholder tokens, expected "
                         f"{int(expected[b])} ({int(per_seq[b])} images x "
                         f"{self.tokens_per_image} tokens)")

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor,
              images: Optional[torch.Tensor] = None,
              images_per_sequence: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with the image tokens spliced in: [S, B, D] (scattered over the
        sequence under sequence parallelism). First stage only."""
        emb_SBD = self.language_model.embedding(input_ids=tokens, position_ids=position_ids)
        is_image_BS = tokens == self.image_token_id
        num_images = 0 if images is None else images.shape[0]
        self._check_placeholders(is_image_BS, num_images, images_per_sequence)
        if num_images:
            image_IVD = self.image_embeddings(images)
            emb_BSD = emb_SBD.transpose(0, 1).clone()
            # Boolean-mask assignment walks the mask in row-major [B, S] order: sequence 0's
            # placeholders first, each in sequence order, matching the images' order.
            emb_BSD[is_image_BS] = image_IVD.reshape(-1, image_IVD.shape[-1]).to(emb_BSD.dtype)
            emb_SBD = emb_BSD.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            emb_SBD = tensor_parallel.scatter_to_sequence_parallel_region(emb_SBD)
        return emb_SBD

    # -------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                labels: Optional[torch.Tensor] = None, images: Optional[torch.Tensor] = None,
                images_per_sequence: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                packed_seq_params=None) -> torch.Tensor:
        """tokens/position_ids/labels [B, S], images [I, 3, H, H], images_per_sequence [B],
        padding_mask [B, S] bool (tokens counted in MoE routing statistics), packed_seq_params
        (Megatron's PackedSeqParams: document boundaries for the attention kernel).

        Returns the per-token loss [B, S] on the last stage when ``labels`` are given (the
        caller applies its loss mask: text tokens only), else logits [B, S, vocab/TP] on the
        last stage, or hidden states [S, B, D] on the others. Images are read on the first
        stage only."""
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(tokens, position_ids, images, images_per_sequence)
        return self.language_model(tokens, position_ids, attention_mask,
                                   decoder_input=decoder_input, labels=labels,
                                   padding_mask=padding_mask,
                                   packed_seq_params=packed_seq_params)

"""The released SSP-SAM's computation, run on our model's parameters: the baseline of the speed benchmarks.

The speed goals of issue 12 are ratios against "the release's computation": what the released
``models/ssp_sam_224.py`` and its modified ``segment_anything`` compute for a batch of B
(image, expression) pairs, in fp32. This module writes that computation out, step by step in the
release's order, over the parameters of one of our :class:`~ssp_sam.model.SSPSAM` models, so that
a benchmark times both on the very same weights and can check, before timing, that both give the
same masks and boxes (they must: the release's numbers are what ours reproduce).

What the release does that ours does not, and this baseline therefore does too:

- CLIP-Surgery's last blocks compute both attentions with explicit ``q @ k^T``, softmax and
  ``@ v`` matmuls (no fused attention), every step, for every sample;
- the patch-sentence similarity is a Python loop over the B samples (one (1+N, E) @ (E, 1)
  product each), then min-max normalised over the patches;
- the attentions of VAD's verification and of the prompt generator are called with
  ``need_weights=True`` (``nn.MultiheadAttention``'s default, which the release keeps), so the
  head-averaged attention maps are computed and thrown away; the prompt generator is given an
  all-False key padding mask;
- SAM's prompt encoder and stock mask decoder (segment_anything's own transformer and attention
  classes: our models are built with the fused ones of ``ssp_sam/attention.py``) are called once per
  image (B calls, each computing all four masks and the IoU head before mask 0 is kept), and each
  image's 256x256 logits are resized to 1024 and then to 512 on their own.

Left out, because they cost nothing measurable on a CPU and change no result: the release's box
post-processing of each sample into SAM's frame (computed, then unused: SAM gets no box prompt),
the stacking of the decoder's upscaled embeddings it returns and never reads, and its
sequence-first tensor layout (the same products, transposed).

Only the released design is covered (both adapters with verification and Gaussian score, the
encoder-mode prompt generator, the release's token-axis normalisation of CLIP's features):
:func:`check_released_design` refuses any other configuration.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor
from torch.nn import functional as F

from ssp_sam.attention import FUSED_DECODER_CLASSES
from ssp_sam.model import SSPSAM


def check_released_design(model: SSPSAM) -> None:
    """Raise ValueError unless ``model`` has the released architecture this baseline computes."""
    config = model.config
    adapters, generator = config.adapters, config.prompt_generator
    differences = [
        name
        for name, released in (
            ("adapters.visual", adapters.visual),
            ("adapters.verification", adapters.verification),
            ("adapters.gaussian", adapters.gaussian),
            ("adapters.linguistic", adapters.linguistic),
            ("prompt_generator.mode == 'encoder'", generator.mode == "encoder"),
            ("not prompt_generator.positions_in_values", not generator.positions_in_values),
            ("release_quirks", config.release_quirks),
        )
        if not released
    ]
    if differences:
        raise ValueError(f"the release baseline computes the released design only; this model differs in: {', '.join(differences)}")


class ReleaseComputation:
    """SSP-SAM's forward pass as the release computes it, on the parameters of ``model``.

    Holds no parameters of its own: training it trains ``model``. ``model.train()`` /
    ``model.eval()`` switch the dropout of VAD's text attention, as in the release.
    """

    def __init__(self, model: SSPSAM) -> None:
        check_released_design(model)
        self.model = model

    # ------------------------------------------------------------------------------- frozen CLIP

    @torch.no_grad()
    def clip_image_tokens(self, clip_pixels: Tensor) -> Tensor:
        """(B, 3, S, S) letterboxed pixels -> (B, 1+N, E) CLIP-Surgery tokens, explicit attention."""
        backbone = self.model.clip
        visual = backbone.clip.visual
        blocks = visual.transformer.resblocks
        first_dual = len(blocks) - backbone.surgery_blocks

        x = visual.conv1(clip_pixels).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x)
        sequence_first = not visual.transformer.batch_first
        x = x.transpose(0, 1) if sequence_first else x
        for block in blocks[:first_dual]:  # open_clip's block is the release's plain block
            x = block(x)
        x = x.transpose(0, 1) if sequence_first else x

        surgery, original = x, x
        for block in blocks[first_dual:]:
            value_value, standard = self._surgery_attention(block.attn, block.ln_1(original))
            original = original + standard
            original = original + block.mlp(block.ln_2(original))
            surgery = surgery + value_value  # no MLP on the surgery path
        tokens = torch.cat([original[:, :1], surgery[:, 1:]], dim=1)  # CLS from the original path
        return visual.ln_post(tokens) @ visual.proj

    @staticmethod
    def _surgery_attention(attention: torch.nn.MultiheadAttention, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, W) -> (value-value attention, standard attention), each (B, T, W), as two explicit softmaxes."""
        batch, length, width = x.shape
        heads = attention.num_heads
        scale = (width // heads) ** -0.5
        qkv = F.linear(x, attention.in_proj_weight, attention.in_proj_bias)
        q, k, v = qkv.reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        standard = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        value_value = ((v @ v.transpose(-2, -1)) * scale).softmax(dim=-1)
        outputs = [(weights @ v).transpose(1, 2).reshape(batch, length, width) for weights in (value_value, standard)]
        return attention.out_proj(outputs[0]), attention.out_proj(outputs[1])

    @torch.no_grad()
    def clip_text(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) token ids -> sentence (B, E) and words (B, L, W): CLIP's text tower."""
        clip = self.model.clip.clip
        x = clip.token_embedding(tokens) + clip.positional_embedding
        words = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        sentence = words[torch.arange(tokens.shape[0], device=tokens.device), tokens.argmax(dim=-1)] @ clip.text_projection
        return sentence, words

    # ----------------------------------------------------------------------- the trained modules

    def forward(self, clip_pixels: Tensor, tokens: Tensor, sam_embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """The release's SSP_SAM.forward from cached SAM embeddings.

        Args:
            clip_pixels: (B, 3, S_clip, S_clip); tokens: (B, L); sam_embeddings: (B, C, h, w).
        Returns:
            mask_logits (B, 1, S/2, S/2) in the padded SAM frame, boxes (B, 4) cxcywh.
        """
        image_features = self.clip_image_tokens(clip_pixels)
        sentence, words = self.clip_text(tokens)
        return self.decode(image_features, sentence, words, tokens, sam_embeddings)

    def decode(
        self, image_features: Tensor, sentence: Tensor, words: Tensor, tokens: Tensor, sam_embeddings: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Everything after the frozen CLIP encoders (image_features (B, 1+N, E), sentence (B, E), words (B, L, W))."""
        model = self.model
        batch = image_features.shape[0]
        grid = model.clip.grid_size
        image_features = image_features / image_features.norm(dim=1, keepdim=True)  # over the tokens (release)
        sentence = sentence / sentence.norm(dim=-1, keepdim=True)

        # Patch-sentence similarity, one sample at a time, min-max over the patches.
        similarity = torch.stack([image_features[i][None] @ sentence[i][None].t() for i in range(batch)]).squeeze(1)
        similarity = similarity[:, 1:, :]
        low, high = similarity.min(1, keepdim=True)[0], similarity.max(1, keepdim=True)[0]
        similarity_map = ((similarity - low) / (high - low)).reshape(batch, grid, grid, 1)

        # LAD: GRU over the projected words, word scores, padding removed, weights renormalised.
        projected_words = model.word_proj(words)
        gru_out, _ = model.linguistic_adapter.gru(projected_words)
        padding = tokens == 0
        word_weights = F.softmax(model.linguistic_adapter.word_score(gru_out).squeeze(2), dim=-1) * (~padding).float()
        word_weights = word_weights / word_weights.sum(1, keepdim=True)
        phrase = torch.bmm(word_weights.unsqueeze(1), projected_words)  # (B, 1, D)

        # VAD: similarity-weighted patches, MLP, verification against the attended words.
        adapter = model.visual_adapter
        patches = image_features[:, 1:, :].reshape(batch, grid, grid, -1) * similarity_map
        queries = adapter.query_mlp(patches).reshape(batch, grid * grid, -1)
        attended = adapter.text_attention(queries, projected_words, projected_words, key_padding_mask=padding)[0]
        score = (
            F.normalize(adapter.query_proj(queries), p=2, dim=-1) * F.normalize(adapter.attended_text_proj(attended), p=2, dim=-1)
        ).sum(dim=-1, keepdim=True)
        score = adapter.gauss_scale * torch.exp(-(1 - score).pow(2.0) / (2 * adapter.gauss_sigma**2))
        verified = adapter.norm(queries) * score
        multimodal = model.fusion.proj(torch.tanh(verified) * torch.tanh(phrase))  # (B, N, C)

        # Prompt generator: [reg; prompts; multimodal] through the post-norm encoder layers.
        generator = model.prompt_generator
        learned = torch.cat([generator.reg_token.weight, generator.prompt_tokens.weight]).unsqueeze(0).repeat(batch, 1, 1)
        x = torch.cat([learned, multimodal], dim=1)
        pos = generator.pos_embed.weight.unsqueeze(0).repeat(batch, 1, 1)
        no_padding = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        for layer in generator.layers:
            q = k = x + pos
            x = layer.norm1(x + layer.dropout(layer.self_attn(q, k, x, key_padding_mask=no_padding)[0]))
            x = layer.norm2(x + layer.dropout(layer.linear2(layer.dropout(F.relu(layer.linear1(x))))))
        x = generator.norm(x)
        boxes = generator.box_head(x[:, 0]).sigmoid()
        prompts = x[:, 1 : 1 + generator.num_prompt_tokens]
        return self.sam_masks(prompts, sam_embeddings), boxes

    def sam_masks(self, prompts: Tensor, sam_embeddings: Tensor) -> Tensor:
        """SAM's prompt encoder and stock mask decoder once per image: (B, T, C), (B, C, h, w) -> (B, 1, S/2, S/2)."""
        prompt_encoder = self.model.mask_head.prompt_encoder
        mask_decoder = self.model.mask_head.mask_decoder
        size = self.model.sam_image_size
        masks = []
        with segment_anythings_decoder_classes(mask_decoder):
            for image_prompts, embedding in zip(prompts, sam_embeddings):
                sparse, dense = prompt_encoder(points=None, boxes=None, masks=None)  # (1, 0, C), no-mask (1, C, h, w)
                sparse = torch.cat([sparse, image_prompts[None]], dim=1)
                low_res, _ = mask_decoder(
                    image_embeddings=embedding.unsqueeze(0),
                    image_pe=prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
                full = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)[..., :size, :size]
                masks.append(F.interpolate(full, (size // 2, size // 2), mode="bilinear", align_corners=False).squeeze(1))
        return torch.stack(masks, dim=0)


@contextmanager
def segment_anythings_decoder_classes(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block, the mask decoder's fused transformer classes (ssp_sam/attention.py, which our
    models are built with) are segment_anything's own again, as in the release; restored afterwards.
    Only classes change (the fused ones add no state), so the parameters and their gradients are shared."""
    stock = {fused: original for original, fused in FUSED_DECODER_CLASSES.items()}
    swapped = [(child, type(child)) for child in module.modules() if type(child) in stock]
    for child, fused in swapped:
        child.__class__ = stock[fused]
    try:
        yield
    finally:
        for child, fused in swapped:
            child.__class__ = fused

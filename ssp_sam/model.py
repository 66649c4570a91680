"""SSP-SAM: frozen CLIP and SAM encoders, the two adapters, the prompt generator and SAM's decoder.

Data flow for a batch of B (image, expression) pairs (shapes for SSP-SAM-224; SSP-SAM-336 has
576 patches and 768-wide CLIP outputs, projected to the same 512-wide adapters):

    CLIP image (B,3,224,224) --CLIP-Surgery--> tokens (B,1+196,512) --+
    text ids (B,77) --CLIP text--> words (B,77,512), sentence (B,512) --+--> VAD --> (B,196,512)
                                 words --word_proj--> (B,77,512) --LAD--> phrase (B,512)
    fusion (B,196,256) --prompt generator--> prompts (B,128,256), box (B,4)
    SAM image (B,3,1024,1024) --frozen ViT--> embedding (B,256,64,64) --+
    prompts + embedding --SAM mask decoder--> logits (B,1,256,256) --> padded frame (B,1,512,512)

The encoders are frozen: their outputs can be computed once per image (and SAM's cached on
disk) and shared by all expressions of the image; :meth:`SSPSAM.decode` takes them as inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .adapters import LinguisticAttentionAdapter, PatchProjection, VisualAttentionAdapter
from .backbones.clip import CLIPSurgeryBackbone, build_clip_model
from .backbones.sam import build_sam
from .backbones.sam_decoder import SAMMaskHead
from .backbones.sam_frames import upscale_to_padded_frame
from .config import ModelConfig
from .errors import ConfigError
from .prompt_generator import MultimodalFusion, PromptGenerator


@dataclass
class TextFeatures:
    """CLIP text outputs for B expressions.

    words: (B, L, W) ln_final outputs at every position (W = text width, unprojected).
    sentence: (B, D) sentence embedding (EOT token @ text_projection).
    padding: (B, L) True where the token id is 0.
    """

    words: Tensor
    sentence: Tensor
    padding: Tensor

    def expand(self, batch: int) -> "TextFeatures":
        return TextFeatures(*(t.expand(batch, *t.shape[1:]) for t in (self.words, self.sentence, self.padding)))


@dataclass
class SSPOutput:
    """What the model predicts for B (image, expression) pairs.

    low_res_logits: (B, 1, s, s) SAM decoder logits (s = 4 x embedding side, 256 for real SAM);
        None when the model ran without SAM embeddings (the REC pretraining stage), like mask_logits.
    mask_logits: (B, 1, S/2, S/2) logits in the padded SAM frame (512 for real SAM), where the
        losses are computed; threshold > 0.
    boxes: (B, 4) REC box, (cx, cy, w, h) normalised to the CLIP letterbox square.
    similarity: (B, N) VAD's patch-sentence similarity map, or None without VAD.
    word_weights: (B, L) LAD's word weights, or None without LAD.
    """

    low_res_logits: Optional[Tensor]
    mask_logits: Optional[Tensor]
    boxes: Tensor
    similarity: Optional[Tensor]
    word_weights: Optional[Tensor]


def patch_centres(grid_size: int, image_size: int) -> Tensor:
    """(grid_size**2, 2) pixel positions (x, y) in SAM's input frame of the CLIP patch centres.

    Row-major like the CLIP patch tokens. The CLIP square is laid on SAM's square, which is exact
    for square images; for others it is only a starting point (the positions are trained).
    SAM's prompt encoder adds 0.5 to a click, so the centres are given half a pixel early.
    """
    centres = (torch.arange(grid_size, dtype=torch.float32) + 0.5) * (image_size / grid_size) - 0.5
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=1)


class SSPSAM(nn.Module):
    """The SSP-SAM model. Build it with :func:`build_model`.

    Attributes:
        clip: frozen CLIP-Surgery image and text encoder.
        sam_image_encoder: frozen SAM ViT, or None when embeddings come from a cache.
        word_proj: Linear(text width -> D), shared by VAD's text attention and LAD
            (D = ``config.adapters.dim``, 512 for the released models).
        visual_adapter / linguistic_adapter: the adapters, None when switched off.
        patch_projection: without VAD only, the CLIP patches' projection to D (the paper's
            "w/o VAD"); None with VAD.
        fusion: tanh-product fusion to the prompt width.
        prompt_generator: transformer producing SAM prompts and the REC box.
        mask_head: SAM's (frozen) prompt encoder and (trainable) mask decoder.
    """

    def __init__(
        self,
        config: ModelConfig,
        clip: CLIPSurgeryBackbone,
        mask_head: SAMMaskHead,
        sam_image_encoder: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.clip = clip
        self.sam_image_encoder = sam_image_encoder
        if sam_image_encoder is not None:
            sam_image_encoder.requires_grad_(False)
        self.mask_head = mask_head

        adapters = config.adapters
        dim = clip.embed_dim if adapters.dim is None else adapters.dim
        prompt_dim = mask_head.embed_dim
        if not adapters.linguistic and dim != clip.embed_dim:
            raise ConfigError(
                f"model.adapters.linguistic=false uses the CLIP sentence embedding ({clip.embed_dim} wide) as the "
                f"phrase, so model.adapters.dim must equal it, got {dim}"
            )
        self.word_proj = nn.Linear(clip.text_width, dim)
        self.visual_adapter = (
            VisualAttentionAdapter(
                clip.embed_dim,
                dim,
                num_heads=adapters.num_heads,
                mlp_layers=adapters.mlp_layers,
                verification=adapters.verification,
                gaussian=adapters.gaussian,
                text_attention_dropout=adapters.text_attention_dropout,
                token_axis_norm=config.release_quirks,
            )
            if adapters.visual
            else None
        )
        self.patch_projection = (
            None
            if adapters.visual
            else PatchProjection(clip.embed_dim, dim, mlp_layers=adapters.mlp_layers, token_axis_norm=config.release_quirks)
        )
        self.linguistic_adapter = LinguisticAttentionAdapter(dim) if adapters.linguistic else None
        self.fusion = MultimodalFusion(dim, prompt_dim)
        generator = config.prompt_generator
        self.prompt_generator = PromptGenerator(
            dim=prompt_dim,
            num_prompt_tokens=generator.num_prompt_tokens,
            num_visual_tokens=clip.num_patches,
            depth=generator.depth,
            num_heads=generator.num_heads,
            ffn_dim=generator.ffn_dim,
            dropout=generator.dropout,
            mode=generator.mode,
            position_init="random" if generator.position_init == "sam_click" else generator.position_init,
            positions_in_values=generator.positions_in_values,
        )
        if generator.position_init == "sam_click":
            self.prompt_generator.init_patch_positions(
                mask_head.click_embeddings(patch_centres(clip.grid_size, self.sam_image_size))
            )

    @property
    def sam_image_size(self) -> int:
        """Side of SAM's square input (1024 for the official models)."""
        return self.mask_head.image_size

    @property
    def device(self) -> torch.device:
        return self.word_proj.weight.device

    def train(self, mode: bool = True) -> "SSPSAM":
        """Frozen encoders stay in eval mode whatever the rest of the model does."""
        super().train(mode)
        self.clip.eval()
        if self.sam_image_encoder is not None:
            self.sam_image_encoder.eval()
        self.mask_head.prompt_encoder.eval()
        return self

    def encode_clip_image(self, clip_pixels: Tensor) -> Tensor:
        """(B, 3, S_clip, S_clip) letterboxed, normalised -> (B, 1+N, D) CLIP-Surgery tokens (with a graph
        only through fine-tuned image blocks, ``model.finetune_image_blocks``)."""
        return self.clip.encode_image(clip_pixels)

    @torch.no_grad()
    def encode_sam_image(self, sam_pixels: Tensor) -> Tensor:
        """(B, 3, S, S) SAM-preprocessed -> (B, C, S/16, S/16) image embedding."""
        if self.sam_image_encoder is None:
            raise RuntimeError("this model was built without a SAM image encoder (embeddings come from a cache)")
        return self.sam_image_encoder(sam_pixels)

    def encode_text(self, tokens: Tensor) -> TextFeatures:
        """(B, L) token ids -> TextFeatures (with a graph only through a fine-tuned text tower, see
        ``CLIPSurgeryBackbone.encode_text``)."""
        words, sentence = self.clip.encode_text(tokens)
        return TextFeatures(words=words, sentence=sentence, padding=tokens == 0)

    def decode(
        self, image_tokens: Tensor, sam_embeddings: Optional[Tensor], text: TextFeatures, image_of: Optional[Tensor] = None
    ) -> SSPOutput:
        """Everything after the frozen encoders, batched over expressions.

        Args:
            image_tokens: (B, 1+N, D) CLIP-Surgery tokens; B may be 1 for K expressions of one image,
                or U for the U images of ``image_of``.
            sam_embeddings: (B, C, h, w) SAM image embeddings; B may be 1 or U likewise. None: only
                the box is computed and SAM's decoder is not run (the REC pretraining stage).
            text: TextFeatures of K expressions (K = B, or K > 1 with B = 1 or with ``image_of``).
            image_of: (K,) long, the image (row of image_tokens and sam_embeddings) of each
                expression; SAM's decoder then works on each image once where it can (SAMMaskHead).
        Returns:
            SSPOutput for the K pairs.
        """
        batch = text.words.shape[0]
        if image_of is not None:
            image_tokens = image_tokens.index_select(0, image_of)
        elif image_tokens.shape[0] == 1:
            image_tokens = image_tokens.expand(batch, -1, -1)
        words = self.word_proj(text.words)

        if self.visual_adapter is not None:
            visual, similarity = self.visual_adapter(image_tokens, text.sentence, words, text.padding)
        else:
            visual, similarity = self.patch_projection(image_tokens), None
        if self.linguistic_adapter is not None:
            phrase, word_weights = self.linguistic_adapter(words, text.padding)
        else:
            phrase, word_weights = F.normalize(text.sentence, dim=-1), None

        prompts, boxes = self.prompt_generator(self.fusion(visual, phrase))
        if sam_embeddings is None:
            return SSPOutput(None, None, boxes, similarity, word_weights)
        low_res_logits = self.mask_head(sam_embeddings, prompts, image_of)
        mask_logits = upscale_to_padded_frame(low_res_logits, self.sam_image_size)
        return SSPOutput(low_res_logits, mask_logits, boxes, similarity, word_weights)

    def forward(self, clip_input: Tensor, text_input: Tensor | TextFeatures, sam_embeddings: Optional[Tensor]) -> SSPOutput:
        """Training/evaluation forward from the CLIP inputs (or their cached outputs) and SAM embeddings.

        Args:
            clip_input: (B, 3, S_clip, S_clip) letterboxed CLIP pixels, or the (B, 1+N, D) CLIP-Surgery
                tokens already computed from them (``ssp_sam.feature_cache.ImageTokenCache``).
            text_input: (B, L) token ids, or their TextFeatures (``ssp_sam.feature_cache.TextFeatureCache``).
            sam_embeddings: as in :meth:`decode`.
        """
        image_tokens = self.encode_clip_image(clip_input) if clip_input.dim() == 4 else clip_input
        text = text_input if isinstance(text_input, TextFeatures) else self.encode_text(text_input)
        return self.decode(image_tokens, sam_embeddings, text)


ENCODER_WEIGHT_KEYS = {"clip": "model.clip_checkpoint", "sam": "model.sam_checkpoint"}


def require_weight_files(config: ModelConfig, parts: Iterable[str] = ("clip", "sam"), reason: str = "") -> None:
    """Refuse to build random encoders by accident.

    Args:
        config: the model config.
        parts: the parts ("clip", "sam") whose weights can only come from their weight files here.
        reason: appended to the message (e.g. why a checkpoint cannot provide them).
    Raises:
        ConfigError: naming the missing keys, unless ``config.random_encoders`` allows random weights.
    """
    if config.random_encoders:
        return
    given = {"clip": config.clip_checkpoint, "sam": config.sam_checkpoint}
    missing = [ENCODER_WEIGHT_KEYS[part] for part in parts if given[part] is None]
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)}: no weight file given{reason}; without it the encoder would be random "
            "and its masks meaningless (random encoders only with model.random_encoders=true, for tests and benchmarks)"
        )


def build_model(
    config: ModelConfig, with_sam_image_encoder: bool = True, without_weight_files: Iterable[str] = ()
) -> SSPSAM:
    """Build SSP-SAM from a config, loading the CLIP and SAM weight files it names.

    Args:
        config: a validated :class:`ModelConfig`.
        with_sam_image_encoder: False for training/evaluation from cached SAM embeddings, so that
            no SAM ViT is allocated at all.
        without_weight_files: parts ("clip", "sam") whose weights do not come from their weight
            files: loaded afterwards from a checkpoint, or never used (SAM in the REC stage).
    Raises:
        ConfigError: a needed weight file is not given (see :func:`require_weight_files`).
    """
    require_weight_files(config, [part for part in ENCODER_WEIGHT_KEYS if part not in set(without_weight_files)])
    clip_model = build_clip_model(config.clip_arch, config.clip_checkpoint, config.clip_custom)
    clip = CLIPSurgeryBackbone(
        clip_model, surgery_blocks=config.surgery_blocks, finetune_text=config.finetune_text_encoder,
        finetune_image_blocks=config.finetune_image_blocks,
    )
    parts = ("image_encoder", "prompt_encoder", "mask_decoder") if with_sam_image_encoder else ("prompt_encoder", "mask_decoder")
    sam = build_sam(config.sam_variant, config.sam_checkpoint, config.sam_custom, parts=parts)
    return SSPSAM(config, clip, SAMMaskHead(sam.prompt_encoder, sam.mask_decoder), sam.image_encoder)


def build_sam_image_encoder(config: ModelConfig) -> nn.Module:
    """SAM's image encoder alone, loaded from the weight file ``config`` names (for the embedding cache)."""
    require_weight_files(config, ["sam"], reason=" for SAM's image encoder (embeddings of uncached images)")
    return build_sam(config.sam_variant, config.sam_checkpoint, config.sam_custom, parts=("image_encoder",)).image_encoder


def parameter_counts(model: SSPSAM) -> dict[str, int]:
    """Parameter counts: the release's own grouping (the paper's figure), ours, and the total.

    ``trainable_params`` counts what this model trains: adapters, fusion, prompt generator and
    SAM's mask decoder. ``params_release_grouping`` counts the parameters of the released model
    outside its two frozen encoders and SAM's frozen prompt encoder: ours plus two modules that
    the release declares but its forward pass never uses, ``img2img_attn`` (an attention whose
    in/out projections are parameters, 4C^2 + 4C, while its relative-position tables are buffers)
    and ``norm_text_cond_img`` (a LayerNorm, 2C). For SSP-SAM-224 that is the paper's 18.37 M.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    width = model.mask_head.embed_dim
    unused_release = (4 * width * width + 4 * width) + 2 * width
    return {
        "params_release_grouping": trainable + unused_release,
        "trainable_params": trainable,
        "total_params": total,
    }

"""The two attention adapters of SSP-SAM: visual (VAD) and linguistic (LAD).

Both sit between the frozen CLIP encoders and the prompt generator. Shapes below use
B = batch, N = CLIP patches (196 for ViT-B/16 at 224), L = text context (77), E = CLIP
embedding width (512 for ViT-B/16, 768 for ViT-L/14@336) and D = adapter width (512 for both
released models).
"""

from __future__ import annotations

import torch
from segment_anything.modeling.mask_decoder import MLP
from torch import Tensor, nn
from torch.nn import functional as F

from .attention import multi_head_attention


def minmax_normalise(x: Tensor, dim: int = -1) -> Tensor:
    """Rescale ``x`` to [0, 1] along ``dim``; a constant slice maps to 0 instead of NaN."""
    low = x.amin(dim=dim, keepdim=True)
    high = x.amax(dim=dim, keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-12)


def normalised_patches(image_tokens: Tensor, token_axis_norm: bool) -> Tensor:
    """(B, 1+N, E) CLIP tokens -> (B, N, E) L2-normalised patch tokens (CLS dropped).

    ``token_axis_norm`` reproduces a quirk of the released checkpoints: the features are
    normalised over the token axis (CLS included) instead of the channel axis.
    """
    return F.normalize(image_tokens, dim=1 if token_axis_norm else -1)[:, 1:]


class PatchProjection(nn.Module):
    """The paper's "w/o VAD": the normalised CLIP patches through the VAD's MLP (E -> D), nothing else.

    As the release's ablation models (models/ablation/ssp_sam_224_only_LAD*.py): no similarity
    weighting, no verification, no LayerNorm.
    """

    def __init__(self, clip_dim: int, dim: int, mlp_layers: int = 3, token_axis_norm: bool = False) -> None:
        super().__init__()
        self.token_axis_norm = token_axis_norm
        self.mlp = MLP(clip_dim, dim, dim, mlp_layers)

    def forward(self, image_tokens: Tensor) -> Tensor:
        """(B, 1+N, E) CLIP tokens -> (B, N, D)."""
        return self.mlp(normalised_patches(image_tokens, self.token_axis_norm))


class VisualAttentionAdapter(nn.Module):
    """VAD: weight CLIP patch tokens by their similarity to the sentence, then verify them.

    1. A similarity map between every patch and the sentence embedding (min-max normalised over
       patches, computed at CLIP's width E) scales the patch tokens, which an MLP (E -> D -> D -> D)
       turns into image queries.
    2. Verification (``verification=False`` removes its modules): the image queries attend to the
       words (attention dropout ``text_attention_dropout`` in training, 0.1 in the release); the
       cosine c between the projected queries and their attended text gives a per-patch score,
       ``scale * exp(-(1 - c)^2 / (2 sigma^2))``, or c itself with ``gaussian=False`` (the paper's
       "w/o Gaussian").
    3. The output is LayerNorm(image queries) times the score.

    ``token_axis_norm``: see :func:`normalised_patches`.
    """

    def __init__(
        self,
        clip_dim: int,
        dim: int,
        num_heads: int = 8,
        mlp_layers: int = 3,
        verification: bool = True,
        gaussian: bool = True,
        text_attention_dropout: float = 0.0,
        token_axis_norm: bool = False,
    ) -> None:
        super().__init__()
        self.token_axis_norm = token_axis_norm
        self.query_mlp = MLP(clip_dim, dim, dim, mlp_layers)
        self.norm = nn.LayerNorm(dim)
        self.verification = verification
        self.gaussian = gaussian and verification
        if verification:
            self.text_attention = nn.MultiheadAttention(dim, num_heads, dropout=text_attention_dropout, batch_first=True)
            self.attended_text_proj = MLP(dim, dim, dim, 1)
            self.query_proj = MLP(dim, dim, dim, 1)
        if self.gaussian:
            self.gauss_scale = nn.Parameter(torch.ones(1))
            self.gauss_sigma = nn.Parameter(torch.full((1,), 0.5))

    def similarity_map(self, image_tokens: Tensor, sentence: Tensor) -> tuple[Tensor, Tensor]:
        """Patch-sentence similarity in [0, 1].

        Args:
            image_tokens: (B, 1+N, E) CLIP-Surgery tokens, CLS first.
            sentence: (B, E) CLIP sentence embedding.
        Returns:
            patches: (B, N, E) the L2-normalised patch features (the release keeps using the
                normalised features after the similarity).
            similarity: (B, N) similarity, min-max normalised over the N patches.
        """
        patches = normalised_patches(image_tokens, self.token_axis_norm)
        text = F.normalize(sentence, dim=-1)
        return patches, minmax_normalise(torch.einsum("bne,be->bn", patches, text), dim=-1)

    def forward(
        self, image_tokens: Tensor, sentence: Tensor, words: Tensor, word_padding: Tensor
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
            image_tokens: (B, 1+N, E) CLIP-Surgery image tokens.
            sentence: (B, E) sentence embedding.
            words: (B, L, D) word features after the shared word projection.
            word_padding: (B, L) True at padding positions (token id 0).
        Returns:
            fused: (B, N, D) verified visual features.
            similarity: (B, N) the similarity map (useful for visualisation).
        """
        patches, similarity = self.similarity_map(image_tokens, sentence)
        queries = self.query_mlp(patches * similarity.unsqueeze(-1))
        fused = self.norm(queries)
        if self.verification:
            attended = multi_head_attention(self.text_attention, queries, words, words, key_padding_mask=word_padding)
            score = F.cosine_similarity(self.query_proj(queries), self.attended_text_proj(attended), dim=-1)
            if self.gaussian:
                score = self.gauss_scale * torch.exp(-((1.0 - score) ** 2) / (2.0 * self.gauss_sigma**2))
            fused = fused * score.unsqueeze(-1)
        return fused, similarity


class LinguisticAttentionAdapter(nn.Module):
    """LAD: a bidirectional GRU scores every word; the phrase is the score-weighted word sum.

    Padding positions (token id 0) get zero weight and the remaining weights are renormalised
    to sum to one, so the phrase does not depend on how much padding follows the sentence.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gru = nn.GRU(dim, dim, num_layers=1, batch_first=True, bidirectional=True)
        self.word_score = nn.Linear(2 * dim, 1)

    def forward(self, words: Tensor, word_padding: Tensor) -> tuple[Tensor, Tensor]:
        """
        Args:
            words: (B, L, D) word features after the shared word projection.
            word_padding: (B, L) True at padding positions.
        Returns:
            phrase: (B, D) attention-pooled phrase embedding.
            weights: (B, L) word weights (zero at padding, summing to one).
        """
        hidden, _ = self.gru(words)
        weights = torch.softmax(self.word_score(hidden).squeeze(-1), dim=-1)
        weights = weights.masked_fill(word_padding, 0.0)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return torch.einsum("bl,bld->bd", weights, words), weights

"""Backbone + head over multi-crop groups: the reference's MultiCropWrapper."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dino_jax.models.head import DINOHead, HeadConfig
from dino_jax.models.vit import ViTConfig, VisionTransformer


class DINO(nnx.Module):
    """Parameters live under `backbone.*` and `head.*` (`head.last_layer.weight_v/weight_g`)."""

    def __init__(self, vit_config: ViTConfig, head_config: HeadConfig, *, rngs: nnx.Rngs):
        if head_config.in_dim != vit_config.embed_dim:
            raise ValueError(
                f"head in_dim {head_config.in_dim} does not match the backbone's "
                f"embed_dim {vit_config.embed_dim}"
            )
        self.backbone = VisionTransformer(vit_config, rngs=rngs)
        self.head = DINOHead(head_config, rngs=rngs)

    def __call__(
        self, crop_groups: Sequence[jax.Array], *, drop_path_rng: jax.Array | None = None, shards: int = 1
    ) -> jax.Array:
        """Logits (sum of rows of all groups, out_dim), rows in group order, or with `shards` > 1
        (the batch split over that many devices) device by device, each device's rows in group order.

        Each group is (V_i*B, H_i, W_i, C) of one resolution; the backbone runs all groups' tokens
        together (models/block.py), and the head runs once on all feature rows, so a BatchNorm head
        sees the whole multi-crop batch as the reference's does.
        """
        if not crop_groups:
            raise ValueError("crop_groups is empty; expected at least one (rows, H, W, C) array")
        features = self.backbone.forward_groups(crop_groups, drop_path_rng, shards=shards)
        if len(features) > 1:  # device by device: each device's rows stay its own (block.TokenLayout)
            dim = features[0].shape[-1]
            features = [
                jnp.concatenate([f.reshape(shards, -1, dim) for f in features], axis=1).reshape(-1, dim)
            ]
        return self.head(features[0])


def split_backbone(graphdef: nnx.GraphDef, params: nnx.State) -> tuple[nnx.GraphDef, nnx.State]:
    """`(graphdef, params)` of the ViT inside the DINO model `(graphdef, params)` (a student or a
    teacher): what the evaluators and the attention maps take."""
    return nnx.split(nnx.merge(graphdef, params).backbone, nnx.Param)

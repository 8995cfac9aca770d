"""The PyTorch reference (facebookresearch/dino) re-written from its definitions (docs/reference.md
sums them up), for the parity tests: the ViT with `interpolate_pos_encoding`, the DINO head, the multi-crop wrapper, the
loss with centering, the schedules and one training iteration (per-tensor clipping, AdamW
parameter groups, last-layer freeze, EMA teacher, center update), with fp16 (autocast + a gradient
scaler) as an option.

Module and parameter names follow the reference, so `state_dict()` keys are the reference's.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    # The reference truncates at +-2 in absolute units; at std 0.02 that never triggers.
    with torch.no_grad():
        return tensor.normal_(0.0, std).clamp_(-2.0, 2.0)


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = torch.floor(
            keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        )
        return x / keep * mask


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out), attn


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop_path, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, return_attention=False):
        y, attn = self.attn(self.norm1(x))
        if return_attention:
            return attn
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """Inputs NCHW. `forward` returns the final-norm CLS token."""

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        embed_dim=192,
        depth=12,
        num_heads=3,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        eps=1e-6,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, eps) for rate in rates]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        trunc_normal_(self.pos_embed)
        trunc_normal_(self.cls_token)
        self.apply(_init_linear_and_norm)

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_size + 0.1
        h0 = h // self.patch_size + 0.1
        side = int(math.sqrt(n))
        patch_pos = F.interpolate(
            patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos.shape[-2] and int(h0) == patch_pos.shape[-1]
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def prepare_tokens(self, x):
        batch, _, w, h = x.shape  # the reference's "w" is the height
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        return tokens + self.interpolate_pos_encoding(tokens, w, h)

    def forward(self, x):
        x = self.prepare_tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def get_last_selfattention(self, x):
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x, n=1):
        x = self.prepare_tokens(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if len(self.blocks) - index <= n:
                outputs.append(self.norm(x))
        return outputs


def _init_linear_and_norm(module):
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


VARIANTS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def vit(variant: str, patch_size: int = 16, **kwargs) -> VisionTransformer:
    embed_dim, num_heads = VARIANTS[variant]
    return VisionTransformer(
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=12,
        num_heads=num_heads,
        mlp_ratio=4,
        qkv_bias=True,
        eps=1e-6,
        **kwargs,
    )


class DINOHead(nn.Module):
    """`parametrized=True` builds the last layer with the newer
    torch.nn.utils.parametrizations.weight_norm (keys `...original0/original1`)."""

    def __init__(
        self,
        in_dim,
        out_dim,
        use_bn=False,
        norm_last_layer=True,
        nlayers=3,
        hidden_dim=2048,
        bottleneck_dim=256,
        parametrized=False,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear_and_norm)
        linear = nn.Linear(bottleneck_dim, out_dim, bias=False)
        if parametrized:
            self.last_layer = torch.nn.utils.parametrizations.weight_norm(linear)
            gain = self.last_layer.parametrizations.weight.original0
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.last_layer = torch.nn.utils.weight_norm(linear)
            gain = self.last_layer.weight_g
        gain.data.fill_(1)
        if norm_last_layer:
            gain.requires_grad = False

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops):
        if not isinstance(crops, list):
            crops = [crops]
        widths = torch.tensor([crop.shape[-1] for crop in crops])
        ends = torch.cumsum(torch.unique_consecutive(widths, return_counts=True)[1], 0)
        start, outputs = 0, []
        for end in ends.tolist():
            outputs.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(outputs))


class DINOLoss(nn.Module):
    """One process (world size 1): the all-reduce of the center is the identity."""

    def __init__(
        self,
        out_dim,
        ncrops,
        warmup_teacher_temp,
        teacher_temp,
        warmup_teacher_temp_epochs,
        nepochs,
        student_temp=0.1,
        center_momentum=0.9,
    ):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )

    def forward(self, student_output, teacher_output, epoch):
        student_chunks = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_chunks = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total, terms = 0.0, 0
        for iq, q in enumerate(teacher_chunks):
            for v, s in enumerate(student_chunks):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_output)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


def get_params_groups(model):
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients(model, clip):
    norms = []
    for _, param in model.named_parameters():
        if param.grad is not None:
            norm = param.grad.data.norm(2)
            norms.append(norm.item())
            factor = clip / (norm + 1e-6)
            if factor < 1:
                param.grad.data.mul_(factor)
    return norms


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


def train_iteration(
    student,
    teacher,
    dino_loss,
    optimizer,
    crops,
    *,
    it,
    epoch,
    lr_schedule,
    wd_schedule,
    momentum_schedule,
    clip_grad,
    freeze_last_layer,
    fp16_scaler=None,
):
    """One iteration of `train_one_epoch`. Returns the loss.

    `fp16_scaler` (a `torch.amp.GradScaler`) is the reference's `--use_fp16`: forward passes and
    loss under autocast, the loss scaled for backward, gradients unscaled before clipping; None
    runs in float32.
    """
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = lr_schedule[it]
        if index == 0:
            group["weight_decay"] = wd_schedule[it]
    with torch.autocast(crops[0].device.type, enabled=fp16_scaler is not None):
        teacher_output = teacher(crops[:2])
        student_output = student(crops)
        loss = dino_loss(student_output, teacher_output, epoch)
    optimizer.zero_grad()
    if fp16_scaler is None:
        loss.backward()
        if clip_grad:
            clip_gradients(student, clip_grad)
        cancel_gradients_last_layer(epoch, student, freeze_last_layer)
        optimizer.step()
    else:
        fp16_scaler.scale(loss).backward()
        if clip_grad:
            fp16_scaler.unscale_(optimizer)
            clip_gradients(student, clip_grad)
        cancel_gradients_last_layer(epoch, student, freeze_last_layer)
        fp16_scaler.step(optimizer)
        fp16_scaler.update()
    ema_teacher(student, teacher, momentum_schedule[it])
    return loss.item()


@torch.no_grad()
def ema_teacher(student, teacher, m):
    """The teacher update after each step: `teacher = m * teacher + (1 - m) * student`."""
    for param_q, param_k in zip(student.parameters(), teacher.parameters()):
        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


class DistributedWrapper(nn.Module):
    """Stands in for DistributedDataParallel around a network: its keys gain `module.`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def restart_from_checkpoint(path, run_variables=None, **objects):
    """`utils.restart_from_checkpoint`: PyTorch's default `torch.load` (weights-only since 2.6),
    then `load_state_dict(checkpoint[name], strict=False)` for each named object present (without
    `strict` for one whose loader does not take it, an optimizer's), and the run variables copied.
    Returns `{name: what the load returned, or "not found"}`: what the reference prints."""
    checkpoint = torch.load(path, map_location="cpu")
    messages = {}
    for name, target in objects.items():
        if name not in checkpoint or target is None:
            messages[name] = "not found"
            continue
        try:
            messages[name] = target.load_state_dict(checkpoint[name], strict=False)
        except TypeError:
            messages[name] = target.load_state_dict(checkpoint[name])
    for name in run_variables or {}:
        if name in checkpoint:
            run_variables[name] = checkpoint[name]
    return messages

"""A DINO training step as the official recipe writes it (facebookresearch/dino, `main_dino.py`,
`vision_transformer.py`, `utils.py`), the yardstick `bench gpu` times raydino's step against.

Written here from the recipe, not imported from it, with everything that decides its speed kept as
published: its own ViT (explicit attention, softmax(q kᵀ · scale) v, no fused kernel), its DINOHead
(weight-normalised last layer), its multi-crop wrapper (one backbone forward per resolution), its
DINOLoss (centre update inside the loss), AdamW as torch builds it by default on CUDA (foreach, not fused), fp16
autocast with a GradScaler, per-tensor clipping that reads every norm with `.item()`, `loss.item()`
checked every step, and the EMA one parameter at a time.  Imports no Ray and nothing of raydino's
step; `load_from_raydino` copies a raydino network's weights in (their names match: both follow
timm's ViT), so both steps can start from the same weights.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x.div(keep) * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with the attention matrix materialised, as DINO's ViT computes it."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINO's ViT: [CLS] + patches + learned position embedding (bicubic-resampled for other crop sizes)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_hidden: int = 1536,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        rates = np.linspace(0, drop_path_rate, depth)  # stochastic depth grows linearly with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_hidden, qkv_bias, float(r)) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch_embed.patch_size + 0.1, h // self.patch_embed.patch_size + 0.1  # DINO's +0.1
        side = int(math.sqrt(n))
        patch_pos = F.interpolate(patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2), scale_factor=(w0 / side, h0 / side), mode="bicubic")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class WeightNormLinear(nn.Module):
    """y = x (g · v / ‖v‖)ᵀ, row by row, without bias: the recipe's `weight_norm(nn.Linear(...))`."""

    def __init__(self, in_dim: int, out_dim: int, norm_last_layer: bool) -> None:
        super().__init__()
        v = torch.empty(out_dim, in_dim)
        nn.init.trunc_normal_(v, std=0.02)  # DINO's head init, applied before weight norm is added
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        self.weight_v = nn.Parameter(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
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
        self.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """One backbone forward per run of consecutive crops of equal width, then the head on all features."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        ends = torch.cumsum(torch.unique_consecutive(torch.tensor([c.shape[-1] for c in x]), return_counts=True)[1], 0)
        start, output = 0, torch.empty(0, device=x[0].device)
        for end in ends.tolist():
            output = torch.cat((output, self.backbone(torch.cat(x[start:end]))))
            start = end
        return self.head(output)


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, ncrops: int, teacher_temps: np.ndarray, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temps

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total, n_terms = 0.0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n_terms += 1
        total = total / n_terms
        self.update_center(teacher_output)
        return total

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def params_groups(model: nn.Module) -> list[dict[str, Any]]:
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or len(param.shape) == 1 else regularized).append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients(model: nn.Module, clip: float) -> list[float]:
    norms = []
    for p in model.parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def cancel_gradients_last_layer(freeze: bool, model: nn.Module) -> None:
    if freeze:
        for n, p in model.named_parameters():
            if "last_layer" in n:
                p.grad = None


class ReferenceDINO:
    """Student, teacher, loss, optimizer and (fp16) scaler of the recipe; `step` is `train_one_epoch`'s body."""

    def __init__(self, cfg: Any, device: torch.device | str, precision: str = "fp16", teacher_temps: np.ndarray | None = None) -> None:
        self.device = torch.device(device)
        self.cfg = cfg
        m = cfg.model
        dims = vit_dims(cfg)
        student_backbone = VisionTransformer(**dims, drop_path_rate=m.drop_path_rate)
        teacher_backbone = VisionTransformer(**dims)
        head = {"nlayers": m.head_layers, "hidden_dim": m.head_hidden_dim, "bottleneck_dim": m.head_bottleneck_dim}
        self.student = MultiCropWrapper(student_backbone, DINOHead(dims["embed_dim"], m.out_dim, m.head_use_bn, m.norm_last_layer, **head)).to(
            self.device
        )
        self.teacher = MultiCropWrapper(teacher_backbone, DINOHead(dims["embed_dim"], m.out_dim, m.head_use_bn, **head)).to(self.device)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        temps = teacher_temps if teacher_temps is not None else np.array([cfg.loss.teacher_temp])
        ncrops = 2 + cfg.augment.n_local_crops
        self.loss = DINOLoss(m.out_dim, ncrops, temps, cfg.loss.student_temp, cfg.loss.center_momentum).to(self.device)
        # torch's default on CUDA (foreach), made explicit so that a CPU run counts the kernels a GPU would launch
        self.optimizer = torch.optim.AdamW(params_groups(self.student), foreach=True)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.precision = precision

    @property
    def student_module(self) -> nn.Module:
        return getattr(self.student, "module", self.student)

    def step(self, images: list[torch.Tensor], lr: float, wd: float, momentum: float, epoch: int = 0, freeze_last_layer: bool = False) -> float:
        """One iteration of `train_one_epoch` on normalised float crops already on the device; returns the loss."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.scaler is not None):
            teacher_output = self.teacher(images[:2])
            student_output = self.student(images)
            loss = self.loss(student_output, teacher_output, epoch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"Loss is {loss.item()}, stopping training")
        self.optimizer.zero_grad()
        clip = self.cfg.optim.clip_grad
        if self.scaler is None:
            loss.backward()
            if clip:
                clip_gradients(self.student, clip)
            cancel_gradients_last_layer(freeze_last_layer, self.student)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)
                clip_gradients(self.student, clip)
            cancel_gradients_last_layer(freeze_last_layer, self.student)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with torch.no_grad():
            for param_q, param_k in zip(self.student_module.parameters(), self.teacher.parameters()):
                param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()


def vit_dims(cfg: Any) -> dict[str, Any]:
    """The ViT's shape, read off raydino's timm backbone for `cfg.model.arch` (built on the meta device)."""
    from raydino.core.model import build_backbone, is_vit

    with torch.device("meta"):
        timm_vit = build_backbone(cfg.model, img_size=cfg.augment.global_crop_size)
    if not is_vit(timm_vit):
        raise ValueError(f"the reference DINO step is written for ViTs; {cfg.model.arch} is not one")
    attn = timm_vit.blocks[0].attn
    return {
        "img_size": cfg.augment.global_crop_size,
        "patch_size": timm_vit.patch_embed.patch_size[0],
        "embed_dim": timm_vit.embed_dim,
        "depth": len(timm_vit.blocks),
        "num_heads": attn.num_heads,
        "mlp_hidden": timm_vit.blocks[0].mlp.fc1.out_features,
        "qkv_bias": attn.qkv.bias is not None,
    }


def raydino_to_reference_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A raydino MultiCropNetwork's state dict under the reference's names (only the weight norm differs)."""
    rename = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    out = {}
    for key, value in state_dict.items():
        for old, new in rename.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def load_from_raydino(ref: ReferenceDINO, student: nn.Module, teacher: nn.Module) -> None:
    ref.student_module.load_state_dict(raydino_to_reference_state(student.state_dict()))
    ref.teacher.load_state_dict(raydino_to_reference_state(teacher.state_dict()))

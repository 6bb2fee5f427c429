"""The Vision Transformer of Dosovitskiy et al. (arXiv 2010.11929).

Module and parameter names follow timm's ``VisionTransformer`` so that a state dict moves
between the two without renaming; transformers' names are mapped in ``vit.formats.transformers``.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.images import image_pair
from vit.pos_embed import resample_abs_pos_embed, sincos_position_table

# width, depth, heads, mlp width: Table 1 of the paper, plus DeiT's Ti and S
SIZES = {
    "ti": (192, 12, 3, 768),
    "s": (384, 12, 6, 1536),
    "b": (768, 12, 12, 3072),
    "l": (1024, 24, 16, 4096),
    "h": (1280, 32, 16, 5120),
}
HEADS = ("linear", "pretrain", "none")
POOLS = ("token", "avg")
POS_EMBEDS = ("learned", "sincos")


@dataclass
class ViTConfig:
    """Everything needed to rebuild the network (weights aside)."""

    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    head: str = "linear"
    representation_size: int | None = None  # width of the pretraining head's tanh layer
    global_pool: str = "token"
    pos_embed: str = "learned"  # sincos: MAE's fixed 2D sin-cos table, a buffer (saved, never trained)
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    name: str = field(default="", compare=False)

    def __post_init__(self):
        self.image_size = image_pair(self.image_size)
        self.validate()

    def validate(self) -> None:
        h, w = self.image_size
        p = self.patch_size
        if not fits_patches((h, w), p):
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {self.global_pool!r}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            raise ValueError(f"pos_embed sincos needs embed_dim divisible by 4, got {self.embed_dim}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**d)


def fits_patches(image_size: tuple[int, int], patch_size: int) -> bool:
    """Whether an image of ``image_size`` is a whole grid of ``patch_size`` patches."""
    return patch_size > 0 and not (image_size[0] % patch_size or image_size[1] % patch_size)


def parse_model_name(name: str) -> tuple[str, int] | None:
    """``vit_b16`` -> ("b", 16): the size and the patch size; None for a name of another form."""
    m = re.fullmatch(r"vit_(ti|s|b|l|h)(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else None


def config_for(name: str, **overrides) -> ViTConfig:
    """``vit_b16`` -> ViT-B with 16x16 patches; keyword arguments override any field."""
    parsed = parse_model_name(name)
    if not parsed:
        raise ValueError(f"unknown architecture {name!r}: expected vit_<ti|s|b|l|h><patch>, e.g. vit_b16")
    width, depth, heads, mlp = SIZES[parsed[0]]
    args = dict(embed_dim=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=parsed[1], name=name)
    args.update({k: v for k, v in overrides.items() if v is not None})
    return ViTConfig(**args)


class PatchEmbed(nn.Module):
    """Split the image into patches and project each: a convolution with stride = kernel = patch."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax attention matrix (batch, heads, tokens, tokens), for analysis plots."""
        b, n, c = x.shape
        q, k, _ = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return ((q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)).softmax(-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    """Pre-LN transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.attn_drop_rate, cfg.drop_rate)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_dim, cfg.drop_rate)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PreLogits(nn.Module):
    """The hidden tanh layer of the pretraining head (paper §3.1)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.grad_checkpointing = False
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if cfg.pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_position_table(d, cfg.grid_size))
        else:
            self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, d) * 0.02)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # also when built on "meta"
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        # as in timm: with average pooling the final norm is applied after pooling
        avg = cfg.global_pool == "avg"
        self.norm = nn.Identity() if avg else nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if avg else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.pre_logits, self.head = self._make_head(cfg)
        self._init_weights()

    @staticmethod
    def _make_head(cfg: ViTConfig) -> tuple[nn.Module, nn.Module]:
        if cfg.head == "none" or cfg.num_classes == 0:
            return nn.Identity(), nn.Identity()
        if cfg.head == "pretrain":
            hidden = cfg.representation_size or cfg.embed_dim
            return PreLogits(cfg.embed_dim, hidden), nn.Linear(hidden, cfg.num_classes)
        return nn.Identity(), nn.Linear(cfg.embed_dim, cfg.num_classes)

    @property
    def num_features(self) -> int:
        return self.cfg.embed_dim

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                # LeCun normal on the flattened patch, as in the reference JAX code
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                nn.init.trunc_normal_(m.weight, std=math.sqrt(1.0 / fan_in))
                nn.init.zeros_(m.bias)
        self.reset_head()

    def reset_head(self, num_classes: int | None = None, head: str | None = None) -> None:
        """Replace the head; the output layer starts at exactly zero (weights and bias).

        The pretraining head's tanh layer keeps a random init: were it zero too, no
        gradient could ever reach either layer.
        """
        if num_classes is not None or head is not None:
            self.cfg.num_classes = self.cfg.num_classes if num_classes is None else num_classes
            self.cfg.head = self.cfg.head if head is None else head
            self.cfg.validate()
            self.pre_logits, self.head = self._make_head(self.cfg)
            ref = self.cls_token
            self.pre_logits.to(ref.device, ref.dtype)
            self.head.to(ref.device, ref.dtype)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def set_global_pool(self, pool: str) -> None:
        """Switch between class-token and average pooling, keeping the final norm's weights.

        Token pooling normalises every token (``norm``), average pooling the pooled vector
        (``fc_norm``), as in timm; the one LayerNorm moves to the other slot, so a checkpoint
        trained with either pooling loads strictly and then serves with the other.
        """
        if pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {pool!r}")
        if pool != self.cfg.global_pool:
            self.norm, self.fc_norm = self.fc_norm, self.norm
            self.cfg.global_pool = pool

    def set_pos_embed(self, kind: str) -> None:
        """Switch between learned position embeddings and the fixed sin-cos table.

        ``learned`` from ``sincos``: the table becomes a trained parameter starting from its values (MAE
        fine-tunes its encoder's table so); ``sincos`` from ``learned``: the learned values are replaced.
        """
        if kind not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {kind!r}")
        if kind == self.cfg.pos_embed:
            return
        if kind == "sincos" and self.cfg.embed_dim % 4:
            raise ValueError(f"pos_embed sincos needs embed_dim divisible by 4, got {self.cfg.embed_dim}")
        table = self.pos_embed.detach()
        del self.pos_embed
        if kind == "learned":
            self.pos_embed = nn.Parameter(table.clone())
        else:
            fixed = sincos_position_table(self.cfg.embed_dim, self.cfg.grid_size)
            self.register_buffer("pos_embed", fixed.to(table.device, table.dtype))
        self.cfg.pos_embed = kind

    def set_image_size(self, image_size, interpolation: str = "bicubic") -> None:
        """Move to another input resolution with the same patches (paper §3.2): the patch grid follows; learned
        position embeddings are 2D-interpolated from the old grid to the new one (the class token's kept), the
        fixed sin-cos table is recomputed for the new grid (``interpolation`` does not apply to it)."""
        h, w = image_pair(image_size)
        p = self.cfg.patch_size
        if not fits_patches((h, w), p):
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        if (h, w) == self.cfg.image_size:
            return
        old_grid = self.cfg.grid_size
        self.cfg.image_size = (h, w)
        if self.cfg.pos_embed == "sincos":
            old = self.pos_embed
            self.pos_embed = sincos_position_table(self.cfg.embed_dim, self.cfg.grid_size).to(old.device, old.dtype)
            return
        with torch.no_grad():
            resampled = resample_abs_pos_embed(self.pos_embed, self.cfg.grid_size, old_grid, 1, interpolation)
        self.pos_embed = nn.Parameter(resampled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (batch, patches, dim), before the class token and position."""
        h, w = x.shape[-2:]
        if (h, w) != self.cfg.image_size:
            raise ValueError(f"input is {h}x{w} but the model expects {self.cfg.image_size[0]}x{self.cfg.image_size[1]}")
        return self.patch_embed(x)

    def forward_tokens(self, patches: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Run the encoder on patch embeddings; returns [class token, patches...] after the final norm.

        ``keep`` (batch, K) indices: encode only those patches, each with its own position
        embedding (MAE's visible patches); the output then holds 1 + K tokens.
        """
        x = patches + self.pos_embed[:, 1:]
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, x], dim=1))
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def forward_normed_tokens(self, patches: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``forward_tokens`` with every token through the final LayerNorm, whichever the pooling.

        What MAE and MPP predict from (MAE's encoder normalises all tokens): under average pooling the
        LayerNorm sits in ``fc_norm`` and ``norm`` is the identity, so it is applied here per token,
        which also keeps ``fc_norm`` trained (no parameter unused under DDP).
        """
        return self.fc_norm(self.forward_tokens(patches, keep))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.embed(x))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = tokens[:, 1:].mean(dim=1) if self.cfg.global_pool == "avg" else tokens[:, 0]
        return self.fc_norm(pooled)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(tokens))
        return x if pre_logits else self.head(self.pre_logits(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def create_model(name: str, **overrides) -> VisionTransformer:
    return VisionTransformer(config_for(name, **overrides))


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers holding NaN or inf (a diverged run); one pass over the weights."""
    return [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if t.is_floating_point() and not torch.isfinite(t).all()]

"""A PyTorch reference of the released LRM, built from torch.nn and transformers.

Written from the released model's description (facebookresearch/vfusion3d
``lrm/models/generator.py``, ``transformer.py``, ``encoders/dino_wrapper2.py``
and ``rendering/synthesizer_part.py``) with its module structure, so its
``state_dict()`` has exactly the released key names. It is the yardstick for
the Flax model's parity tests; nothing in the library imports it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Config, Dinov2Model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def legacy_interpolate_pos_encoding(self, embeddings, height, width):
  """transformers <= 4.44's DINOv2 position-table resize (scale_factor with +0.1)."""
  num_patches = embeddings.shape[1] - 1
  num_positions = self.position_embeddings.shape[1] - 1
  if num_patches == num_positions and height == width:
    return self.position_embeddings
  cls_pos, patch_pos = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
  dim = embeddings.shape[-1]
  h = height // self.config.patch_size + 0.1
  w = width // self.config.patch_size + 0.1
  side = int(math.sqrt(num_positions))
  patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
  patch_pos = F.interpolate(patch_pos.float(), scale_factor=(h / side, w / side),
                            mode="bicubic", align_corners=False)
  patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
  return torch.cat([cls_pos, patch_pos], dim=1)


class DinoWrapper(nn.Module):

  def __init__(self, width, depth, heads, mlp_dim, patch_size, pos_grid, legacy=True):
    super().__init__()
    config = Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                          mlp_ratio=mlp_dim / width, patch_size=patch_size,
                          image_size=patch_size * pos_grid, layer_norm_eps=1e-6,
                          hidden_act="gelu", attn_implementation="eager")
    self.model = Dinov2Model(config)
    if legacy:
      emb = self.model.embeddings
      emb.interpolate_pos_encoding = legacy_interpolate_pos_encoding.__get__(emb)

  def forward(self, images):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return self.model(pixel_values=(images - mean) / std).last_hidden_state


class ModLN(nn.Module):

  def __init__(self, width, cond_dim, eps):
    super().__init__()
    self.norm = nn.LayerNorm(width, eps=eps)
    self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))

  def forward(self, x, cond):
    shift, scale = self.mlp(cond).chunk(2, dim=-1)
    return self.norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):

  def __init__(self, width, heads, context_dim, cond_dim, mlp_dim, eps):
    super().__init__()
    self.norm1 = ModLN(width, cond_dim, eps)
    self.cross_attn = nn.MultiheadAttention(width, heads, kdim=context_dim, vdim=context_dim,
                                            bias=False, batch_first=True)
    self.norm2 = ModLN(width, cond_dim, eps)
    self.self_attn = nn.MultiheadAttention(width, heads, bias=False, batch_first=True)
    self.norm3 = ModLN(width, cond_dim, eps)
    self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU(), nn.Dropout(0.0),
                             nn.Linear(mlp_dim, width), nn.Dropout(0.0))

  def forward(self, x, context, cond):
    x = x + self.cross_attn(self.norm1(x, cond), context, context, need_weights=False)[0]
    h = self.norm2(x, cond)
    x = x + self.self_attn(h, h, h, need_weights=False)[0]
    return x + self.mlp(self.norm3(x, cond))


class TriplaneTransformer(nn.Module):

  def __init__(self, width, layers, heads, context_dim, cond_dim, mlp_dim, res, channels, eps):
    super().__init__()
    self.res = res
    self.pos_embed = nn.Parameter(torch.randn(1, 3 * res * res, width) * width ** -0.5)
    self.layers = nn.ModuleList(
        [Block(width, heads, context_dim, cond_dim, mlp_dim, eps) for _ in range(layers)])
    self.norm = nn.LayerNorm(width, eps=eps)
    self.deconv = nn.ConvTranspose2d(width, channels, kernel_size=2, stride=2, padding=0)

  def forward(self, context, cond):
    n = context.shape[0]
    x = self.pos_embed.repeat(n, 1, 1)
    for layer in self.layers:
      x = layer(x, context, cond)
    x = self.norm(x)
    r = self.res
    x = torch.einsum("nihwd->indhw", x.view(n, 3, r, r, -1)).contiguous().view(3 * n, -1, r, r)
    x = self.deconv(x)
    x = x.view(3, n, *x.shape[-3:])
    return torch.einsum("indhw->nidhw", x).contiguous()  # [N, 3, C, 2r, 2r]


class Decoder(nn.Module):

  def __init__(self, in_dim, hidden, layers):
    super().__init__()
    mods = [nn.Linear(in_dim, hidden), nn.ReLU()]
    for _ in range(layers - 2):
      mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    mods.append(nn.Linear(hidden, 4))
    self.net = nn.Sequential(*mods)

  def forward(self, features):
    x = self.net(features)
    return x[..., 0], torch.sigmoid(x[..., 1:]) * 1.002 - 0.001


class Synthesizer(nn.Module):

  def __init__(self, channels, hidden, layers):
    super().__init__()
    self.decoder = Decoder(3 * channels, hidden, layers)


class TorchLRM(nn.Module):
  """The released model's structure; ``arch`` is a vf3d_jax LRMArch."""

  def __init__(self, arch, legacy=True):
    super().__init__()
    e = arch.encoder
    self.encoder = DinoWrapper(e.width, e.depth, e.heads, e.mlp_dim, e.patch_size, e.pos_grid,
                               legacy)
    self.camera_embedder = nn.Module()
    self.camera_embedder.mlp = nn.Sequential(nn.Linear(arch.camera_dim, arch.camera_embed_dim),
                                             nn.SiLU(),
                                             nn.Linear(arch.camera_embed_dim, arch.camera_embed_dim))
    self.transformer = TriplaneTransformer(arch.width, arch.layers, arch.heads, e.width,
                                           arch.camera_embed_dim, arch.mlp_dim, arch.triplane_res,
                                           arch.triplane_channels, arch.eps)
    self.synthesizer = Synthesizer(arch.triplane_channels, arch.decoder_hidden, arch.decoder_layers)

  def forward(self, images, cameras):
    """``[N, 3, H, W]`` in [0, 1], ``[N, 16]`` -> planes ``[N, 3, C, R, R]``."""
    return self.transformer(self.encoder(images), self.camera_embedder.mlp(cameras))


def query_field(decoder: Decoder, planes, points):
  """Reference field query: planes ``[3, C, R, R]``, points ``[M, 3]`` in [-1, 1]."""
  coords = torch.stack([points[:, [0, 1]], points[:, [0, 2]], points[:, [2, 1]]])  # [3, M, 2]
  feats = F.grid_sample(planes, coords.unsqueeze(1), mode="bilinear", padding_mode="zeros",
                        align_corners=False)  # [3, C, 1, M]
  feats = feats[:, :, 0].permute(2, 0, 1).reshape(points.shape[0], -1)  # [M, 3 * C]
  return decoder(feats)


def randomize_(module: nn.Module, seed: int = 0, scale: float = 0.5) -> None:
  """Overwrites every parameter with N(0, scale^2 / fan) noise (LayerNorms near 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1 and ("norm" in name and name.endswith("weight") or "lambda1" in name):
        p.copy_(1 + 0.1 * noise)
      elif p.ndim == 1:
        p.copy_(0.1 * noise)
      else:
        fan = p[0].numel() if p.ndim > 1 else p.numel()
        table = name.endswith(("cls_token", "mask_token", "position_embeddings", "pos_embed"))
        p.copy_(noise * 0.5 if table else noise * scale / math.sqrt(max(fan, 1)))

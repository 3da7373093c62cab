"""The DINO networks: projection head, multi-crop wrapper, and the student / teacher pair."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dino_scale.config import ModelConfig
from dino_scale.models.backbones import create_backbone


class DINOHead(nn.Module):
    """Projection head: x -> MLP -> z / ||z||_2 -> W z, where W = g * V / ||V|| row-wise (weight normalisation).

    The MLP has `nlayers` linear layers (hidden width `hidden_dim`, GELU, optional BatchNorm) ending at
    `bottleneck_dim`. With `norm_last_layer` the gain g is fixed at 1, so every output logit is a cosine
    similarity between the bottleneck feature and a prototype row of V.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for index, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(fan_in, fan_out))
            if index < nlayers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(fan_out))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """backbone + head over a list of crops, with one backbone pass per crop resolution (not one per crop).

    Crops of equal size are concatenated along the batch, run together, and the pooled features of all crops are
    projected by the head in one call. Output rows are ordered view by view: [view0 batch, view1 batch, ...].
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def compile_backbone(self, backend: str = "inductor") -> None:
        """Run the backbone through torch.compile in this wrapper's forward, with static shapes: one graph per crop
        resolution (and grad mode), none after the first step of each since the batches keep their size. The compiled
        callable is kept outside the module tree, so parameter names and checkpoints stay as they are, and whoever
        calls `self.backbone` directly (the k-NN evaluation, with other batch sizes) runs it eagerly."""
        self.__dict__["_compiled_backbone"] = torch.compile(self.backbone, backend=backend, dynamic=False)

    def forward(self, views: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(views, torch.Tensor):
            views = [views]
        backbone = self.__dict__.get("_compiled_backbone", self.backbone)
        features = []
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            features.append(backbone(torch.cat(list(views[start:end]))))
            start = end
        return self.head(torch.cat(features))


def build_student_teacher(cfg: ModelConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student with drop-path; teacher of the same architecture without it, starting as an exact copy.

    The teacher never receives gradients: it is updated only by the EMA of the student's weights.
    """
    student_backbone = create_backbone(
        cfg.arch, cfg.drop_path_rate, pos_embed_interpolation=cfg.pos_embed_interpolation, **cfg.timm_kwargs
    )
    embed_dim = student_backbone.num_features
    student = MultiCropWrapper(
        student_backbone,
        DINOHead(
            embed_dim,
            cfg.out_dim,
            cfg.hidden_dim,
            cfg.bottleneck_dim,
            cfg.head_layers,
            cfg.use_bn_in_head,
            cfg.norm_last_layer,
        ),
    )
    teacher = copy.deepcopy(student)
    # Same module structure without stochastic depth: copying the student keeps the weights identical, and
    # switching drop-path off afterwards is cheaper and safer than rebuilding from timm with other kwargs.
    for module in teacher.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return student, teacher

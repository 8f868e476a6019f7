"""The fine-tuned fully connected head: fc6 → fc7 → (K+1)-way classifier.

docs/method.md#fine-tuning-and-sampling.

Shapes: R windows, D pooled feature dim (C·Σn²), F fc width, K foreground classes, C channels.
Class K of the classifier is background; only this head has it
(docs/method.md#conventions-and-box-format).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from spp_detect.errors import UserError
from spp_detect.runtime.artifacts import load_torch

logger = logging.getLogger(__name__)

CLS_WEIGHT_STD = 0.01  # new classifier weights ~ N(0, 0.01²) (released code's fc8_pascal)
CLS_BIAS = 1.0  # fc8_pascal bias filler (released code); a constant shift, softmax-invariant
FC_BIAS = 0.0  # fc6/fc7 bias at random init
HEAD_KEYS = ("fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias", "cls.weight", "cls.bias")
# The optional box branch (finetune.bbox_loss_weight > 0) predicts per-class deltas divided by
# these, so that its four targets have similar spreads (Fast R-CNN's BBOX_NORMALIZE_STDS);
# head_state folds them back in, so a saved head predicts plain deltas.
BOX_DELTA_STDS = (0.1, 0.1, 0.2, 0.2)
BOX_WEIGHT_STD = 0.001  # box branch weights ~ N(0, 0.001²), bias 0 (Fast R-CNN bbox_pred)


class Head(nn.Module):
    """fc6 (D → F) → ReLU → dropout → fc7 (F → F) → ReLU → dropout → cls (F → K+1), and with
    ``box_branch`` a box layer beside cls (F → 4K, per-class deltas, Fast R-CNN's bbox_pred).

    While training from random weights the pooled features may be standardised before fc6
    (``set_input_normalization``); ``head_state`` folds that into fc6, so a saved head takes raw
    pooled features.
    """

    input_shift: Tensor | None
    input_scale: Tensor | None

    def __init__(
        self,
        in_dim: int,
        fc_dim: int,
        num_classes: int,
        dropout: float = 0.5,
        box_branch: bool = False,
    ) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_dim, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.cls = nn.Linear(fc_dim, num_classes + 1)
        self.bbox = nn.Linear(fc_dim, 4 * num_classes) if box_branch else None
        self.dropout = dropout
        # not in the state dict: head_state folds them into fc6
        self.register_buffer("input_shift", None, persistent=False)
        self.register_buffer("input_scale", None, persistent=False)

    @property
    def in_dim(self) -> int:
        return self.fc6.in_features

    @property
    def num_classes(self) -> int:
        """Foreground classes K (the classifier has K + 1 outputs)."""
        return self.cls.out_features - 1

    def forward(
        self,
        pooled: Tensor,
        generator: torch.Generator | None = None,
        rows: BatchRows | None = None,
    ) -> Tensor:
        """Logits (R, K+1) of pooled features (R, D); dropout in training mode only.

        ``generator`` draws the dropout masks, so a resumed run can restore its state.
        ``rows``: ``pooled`` is these rows of a larger minibatch (one rank's share), whose
        masks are drawn whole so that they are those of one process.
        """
        return self.cls(self._hidden(pooled, generator, rows))

    def forward_with_boxes(
        self,
        pooled: Tensor,
        generator: torch.Generator | None = None,
        rows: BatchRows | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Logits (R, K+1) and the box branch's normalised deltas (R, K, 4), from the same
        dropout masks (training)."""
        hidden = self._hidden(pooled, generator, rows)
        assert self.bbox is not None, "a head without a box branch"
        return self.cls(hidden), self.bbox(hidden).view(len(hidden), -1, 4)

    def box_deltas(self, fc7: Tensor, labels: Tensor) -> Tensor:
        """Deltas (M, 4) of class ``labels`` (M,) from fc7 (M, F) of a saved (folded) head."""
        assert self.bbox is not None, "a head without a box branch"
        deltas = self.bbox(fc7).view(len(fc7), -1, 4)
        return deltas[torch.arange(len(fc7), device=fc7.device), labels]

    def _hidden(
        self, pooled: Tensor, generator: torch.Generator | None, rows: BatchRows | None = None
    ) -> Tensor:
        hidden = torch.relu(self.fc6(self._normalized(pooled)))
        hidden = _dropout(hidden, self.dropout, self.training, generator, rows)
        return _dropout(torch.relu(self.fc7(hidden)), self.dropout, self.training, generator, rows)

    def features(self, pooled: Tensor) -> Tensor:
        """fc7 after ReLU (R, F), without dropout whatever the mode (input of the SVMs)."""
        return torch.relu(self.fc7(torch.relu(self.fc6(self._normalized(pooled)))))

    def set_input_normalization(self, shift: Tensor, scale: Tensor) -> None:
        """Feed fc6 with (pooled − shift) · scale, both (D,), from now on."""
        device = self.fc6.weight.device
        self.input_shift, self.input_scale = shift.float().to(device), scale.float().to(device)

    def _normalized(self, pooled: Tensor) -> Tensor:
        if self.input_scale is None or self.input_shift is None:
            return pooled
        return (pooled - self.input_shift) * self.input_scale


@dataclass(frozen=True)
class BatchRows:
    """Rows ``start`` … ``stop`` − 1 of a minibatch of ``total`` rows: one rank's share of it
    under data-parallel fine-tuning."""

    start: int
    stop: int
    total: int


def _dropout(
    x: Tensor,
    p: float,
    training: bool,
    generator: torch.Generator | None,
    rows: BatchRows | None = None,
) -> Tensor:
    """Inverted dropout with an explicit generator (``F.dropout`` takes none). With ``rows``,
    ``x`` (stop − start, F) is a share of a minibatch: the mask of the whole (total, F) batch is
    drawn, as one process draws it, and the share's rows are kept."""
    if not training or p == 0.0:
        return x
    if rows is None:
        keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    else:
        keep = x.new_empty((rows.total, *x.shape[1:])).bernoulli_(1.0 - p, generator=generator)
        keep = keep[rows.start : rows.stop]
    return x * keep / (1.0 - p)


STD_FLOOR = 0.1  # input std floor, as a fraction of the mean std: near-constant inputs
# (dead ReLU units in the first block) are amplified at most 10× more than a typical input


def input_normalization_for(pooled: Tensor) -> tuple[Tensor, Tensor]:
    """Per-input shift (D,) and scale (D,) that standardise pooled features (R, D).

    Used with random fc6/fc7 only: a random-weight trunk gives pooled inputs whose scales
    differ by orders of magnitude (hundreds to thousands overall), and SGD on them unscaled
    diverges or crawls; standardised, He-initialised fc layers start with unit-variance
    activations. Pretrained fc6/fc7 expect their trunk's raw features and get none.
    """
    return normalization_from_moments(pooled_moments(pooled))


def pooled_moments(pooled: Tensor) -> Tensor:
    """Sums (3, D) float64 of pooled features (R, D): [Σx, Σx², R] (R in every column), which
    add up across ranks that hold parts of one block."""
    total = torch.zeros(pooled.shape[1], dtype=torch.float64, device=pooled.device)
    total_sq = torch.zeros_like(total)
    for chunk in pooled.split(4096):
        chunk = chunk.double()
        total += chunk.sum(dim=0)
        total_sq += (chunk * chunk).sum(dim=0)
    return torch.stack([total, total_sq, torch.full_like(total, len(pooled))])


def normalization_from_moments(moments: Tensor) -> tuple[Tensor, Tensor]:
    """Shift (D,) and scale (D,) of ``input_normalization_for`` from ``pooled_moments``."""
    total, total_sq = moments[0], moments[1]
    count = max(int(moments[2, 0]), 1)
    mean = total / count
    std = (total_sq / count - mean * mean).clamp(min=0).sqrt()
    floor = STD_FLOOR * float(std.mean()) if float(std.mean()) > 0 else 1.0
    return mean.float(), (1.0 / std.clamp(min=floor)).float()


def init_random(head: Head, generator: torch.Generator | None = None) -> None:
    """Initialise a head without a pretrained classifier.

    fc6/fc7: He-normal weights (std √(2/fan_in), suits ReLU layers on features of unknown
    scale better than Caffe's fixed N(0, 0.005²)), zero bias. cls: N(0, 0.01²), bias 1
    (released code).
    """
    with torch.no_grad():
        for layer in (head.fc6, head.fc7):
            layer.weight.normal_(0.0, math.sqrt(2.0 / layer.in_features), generator=generator)
            layer.bias.fill_(FC_BIAS)
    init_classifier(head, generator)
    init_box_branch(head, generator)


def init_box_branch(head: Head, generator: torch.Generator | None = None) -> None:
    """The box layer, when there is one: weights N(0, 0.001²), bias 0 (Fast R-CNN)."""
    if head.bbox is None:
        return
    with torch.no_grad():
        head.bbox.weight.normal_(0.0, BOX_WEIGHT_STD, generator=generator)
        head.bbox.bias.zero_()


def init_classifier(head: Head, generator: torch.Generator | None = None) -> None:
    """The new (K+1)-way layer: weights N(0, 0.01²), bias 1 (released code's fc8_pascal)."""
    with torch.no_grad():
        head.cls.weight.normal_(0.0, CLS_WEIGHT_STD, generator=generator)
        head.cls.bias.fill_(CLS_BIAS)


def init_from_classifier(
    head: Head, state: Mapping[str, Tensor], channels: int, levels: Sequence[int]
) -> None:
    """Start fc6/fc7 from a pretrained ImageNet classifier.

    docs/method.md#fine-tuning-and-sampling (initialisation).

    ``state`` holds ``fc6.weight`` (F, C·n²), ``fc6.bias`` (F,), ``fc7.weight`` (F, F) and
    ``fc7.bias`` (F,), n the classifier's pooled size (6 AlexNet, 7 VGG16). The pooled input is
    the levels concatenated in order, each channel-major [C][n][n] like torchvision's flatten, so
    the first level's columns take the classifier's fc6 as is; all other columns start at zero.
    The classifier layer is left alone (``init_classifier`` starts it).
    """
    missing = [key for key in HEAD_KEYS[:4] if key not in state]
    if missing:
        raise ValueError(f"classifier state lacks {', '.join(missing)}")
    fc6_weight = state["fc6.weight"]
    fc_dim, classifier_in = fc6_weight.shape
    pooled_size = math.isqrt(classifier_in // channels) if classifier_in % channels == 0 else 0
    if pooled_size * pooled_size * channels != classifier_in:
        raise UserError(
            f"extract.weights: classifier fc6 takes {classifier_in} inputs, not C·n² for "
            f"C = {channels}; use the weights that match extract.backbone"
        )
    if levels[0] != pooled_size:
        raise UserError(
            f"spp.levels: the first level must be {pooled_size} (the classifier's pooled size) "
            f"to start fc6 from the pretrained classifier; got {tuple(levels)}"
        )
    if head.fc6.out_features != fc_dim:
        raise UserError(
            f"finetune.fc_dim: must be {fc_dim} (the pretrained classifier's width), "
            f"got {head.fc6.out_features}; set finetune.fc_dim={fc_dim}"
        )
    with torch.no_grad():
        head.fc6.weight.zero_()
        head.fc6.weight[:, :classifier_in].copy_(fc6_weight)
        head.fc6.bias.copy_(state["fc6.bias"])
        head.fc7.weight.copy_(state["fc7.weight"])
        head.fc7.bias.copy_(state["fc7.bias"])


def head_state(head: Head) -> dict[str, Tensor]:
    """Tensors only, on the CPU, any input normalisation folded into fc6, ready to use on raw
    pooled features (docs/contracts.md#saved-models-are-ready-to-use):
    W·((x − μ)·s) + b = (W·s)·x + (b − (W·s)·μ)."""
    state = {key: value.detach().cpu().clone() for key, value in head.state_dict().items()}
    if head.input_scale is not None and head.input_shift is not None:
        weight = state["fc6.weight"].double() * head.input_scale.detach().cpu().double()
        bias = state["fc6.bias"].double() - weight @ head.input_shift.detach().cpu().double()
        state["fc6.weight"], state["fc6.bias"] = weight.float(), bias.float()
    if head.bbox is not None:  # predict plain deltas: fold the normalising stds in
        stds = torch.tensor(BOX_DELTA_STDS).repeat(head.num_classes)
        state["bbox.weight"] = state["bbox.weight"] * stds[:, None]
        state["bbox.bias"] = state["bbox.bias"] * stds
    return state


def head_from_state(state: Mapping[str, Tensor], dropout: float = 0.5) -> Head:
    """A head whose sizes come from the state dict's shapes (D, F, K from fc6 and cls)."""
    fc_dim, in_dim = state["fc6.weight"].shape
    num_classes = int(state["cls.weight"].shape[0]) - 1
    head = Head(int(in_dim), int(fc_dim), num_classes, dropout, box_branch="bbox.weight" in state)
    head.load_state_dict(dict(state))
    return head


def load_head(path: str | Path, device: str | torch.device = "cpu") -> Head:
    """The fine-tuned head saved at ``path``, in eval mode on ``device``."""
    state = load_torch(path)
    if not isinstance(state, dict) or any(key not in state for key in HEAD_KEYS):
        raise UserError(f"{path}: not a fine-tuned head; rerun `spp-detect finetune --force`")
    try:
        head = head_from_state(state)
    except (RuntimeError, ValueError) as exc:
        raise UserError(
            f"{path}: inconsistent head shapes ({exc}); rerun finetune --force"
        ) from None
    return head.to(device).eval()


def truncated_svd(layer: nn.Linear, rank: int) -> nn.Sequential:
    """``layer`` (in → out) as two layers through its top ``rank`` singular directions
    (Fast R-CNN §3.1): W ≈ U_k·(U_kᵀ W) = U_k·(S_k V_kᵀ), rank·(in + out) multiply-adds per row
    instead of in·out. With rank ≥ min(in, out) it is W itself, refactored.

    The top singular vectors of the smaller side come from the eigenvectors of W·Wᵀ (or Wᵀ·W):
    one product and a 4,096-square eigendecomposition in float32 (about 2× faster than float64
    and precise enough for the leading directions), instead of the SVD of a 4,096 × 12,800
    matrix. It is still slow on a small CPU: fc6 at the paper's width (4,096 × 12,800) took
    3 minutes in float64 on a 2-core VM under load 10 (docs/benchmarks-history.md)."""
    weight = layer.weight.detach()  # (out, in)
    out_dim, in_dim = weight.shape
    k = min(rank, out_dim, in_dim)
    left = out_dim <= in_dim
    gram = weight @ weight.T if left else weight.T @ weight
    _, vectors = torch.linalg.eigh(gram)  # eigenvalues ascending: the top k are last
    top = vectors[:, -k:]  # (out, k) or (in, k)
    inner, outer = (top.T @ weight, top) if left else (top.T, weight @ top)
    first = nn.Linear(in_dim, k, bias=False).to(weight.device)
    second = nn.Linear(k, out_dim).to(weight.device)
    with torch.no_grad():
        first.weight.copy_(inner)  # (k, in)
        second.weight.copy_(outer)  # (out, k)
        second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


def int8_dynamic(module: nn.Module) -> nn.Module:
    """``module`` with every Linear's weights in int8 and its activations quantised on the fly,
    row by row (``torch.ao.quantization.quantize_dynamic``); the CPU only."""
    import warnings

    with warnings.catch_warnings():  # torch ≥ 2.10 warns that torch.ao moves to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)


def compressed_features(head: Head, compression: str, svd_ranks: tuple[int, int]) -> nn.Module:
    """fc6 → ReLU → fc7 → ReLU of a saved head as one module, pooled (R, D) → fc7 (R, F):
    ``svd`` truncates fc6 and fc7 to ``svd_ranks`` (Fast R-CNN: 1024 and 256), ``int8``
    quantises them dynamically (the CPU only): fewer multiply-adds or cheaper ones, for a small
    change of the scores (tests/test_head.py). ``none``: the same layers, uncompressed."""
    if compression not in ("none", "svd", "int8"):  # config.FC_COMPRESSIONS, checked on load
        raise ValueError(f"unknown fc compression {compression!r}")
    if head.input_scale is not None:
        raise ValueError("compress a saved head (input normalisation folded into fc6)")
    fc6, fc7 = copy.deepcopy(head.fc6), copy.deepcopy(head.fc7)
    if compression == "svd":
        fc6, fc7 = truncated_svd(fc6, svd_ranks[0]), truncated_svd(fc7, svd_ranks[1])
    module = nn.Sequential(fc6, nn.ReLU(), fc7, nn.ReLU()).eval()
    return int8_dynamic(module) if compression == "int8" else module

"""Learned region proposals: an RPN head on the retrieval backbone (Gordo et al. 2016).

The head is torchvision's detection building blocks (`AnchorGenerator`, `RPNHead`,
`RegionProposalNetwork`) over the backbone's last conv map, behind a 1 x 1 reduction of its
channels. The backbone stays frozen: the head sees `square_features`, the map of the image
resized to `image_size` x `image_size` (so every image gives the same map and a batch is one
tensor); boxes are mapped between that square and the stored image's pixels per axis.

Training lives in `raytrieval.trainers.rpn` (boxes of the clean stage as targets, no labels);
`propose` and `collection_regions` turn a trained head into `regions.parquet`.

A saved head is a directory: `rpn.pt` (state dict, loaded with `weights_only=True`) and
`rpn.json` (the `ProposalNet` arguments).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn

from raytrieval.retrieval.extract import ImageSource, to_tensor
from raytrieval.retrieval.imageio import load_image
from raytrieval.retrieval.model import RetrievalNet

RPN_FILE = "rpn.pt"
RPN_META = "rpn.json"


class ProposalNet(nn.Module):
    """1 x 1 reduction + torchvision RPN over a single (frozen) backbone map.

    Args:
        in_channels: channels of the backbone map.
        image_size: side of the square the images are resized to.
        anchor_fractions: anchor sizes as fractions of `image_size`.
        aspect_ratios: anchor aspect ratios (height / width).
        mid_channels: channels after the reduction (the RPN head's width).
        proposals: proposals kept per image after NMS at inference.
        nms_thresh: NMS IoU threshold.
    """

    def __init__(self, in_channels: int, image_size: int = 512,
                 anchor_fractions: Sequence[float] = (0.15, 0.3, 0.5, 0.75),
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), mid_channels: int = 256,
                 proposals: int = 50, nms_thresh: float = 0.7):
        super().__init__()
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

        if image_size < 32:
            raise ValueError(f"image_size: must be >= 32, got {image_size}")
        if proposals < 1:
            raise ValueError(f"proposals: must be >= 1, got {proposals}")
        self.args = dict(in_channels=in_channels, image_size=image_size, anchor_fractions=list(anchor_fractions),
                         aspect_ratios=list(aspect_ratios), mid_channels=mid_channels, proposals=proposals,
                         nms_thresh=nms_thresh)
        self.image_size = image_size
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1), nn.ReLU(inplace=True))
        sizes = tuple(max(1, round(f * image_size)) for f in anchor_fractions)
        anchors = AnchorGenerator(sizes=(sizes,), aspect_ratios=(tuple(aspect_ratios),))
        head = RPNHead(mid_channels, anchors.num_anchors_per_location()[0])
        self.rpn = RegionProposalNetwork(
            anchors, head, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n={"training": 2000, "testing": 1000},
            post_nms_top_n={"training": 2000, "testing": proposals}, nms_thresh=nms_thresh,
        )

    def _images(self, features: torch.Tensor):
        from torchvision.models.detection.image_list import ImageList

        b = features.shape[0]
        s = self.image_size  # only the shape is read (anchor strides, clipping)
        return ImageList(features.new_empty((b, 0, s, s)), [(s, s)] * b)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses.

        Args:
            features: (B, C, h, w) backbone maps of the square images.
            targets: (B, 4) one object box per image, in pixels of the square.

        Returns:
            {'loss_objectness', 'loss_rpn_box_reg'}.
        """
        maps = {"0": self.reduce(features)}
        _, losses = self.rpn(self._images(features), maps, [{"boxes": t[None]} for t in targets])
        return losses

    @torch.no_grad()
    def propose(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(boxes (R, 4) in pixels of the square, objectness (R,)) per image, best first, after NMS."""
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        rpn = self.rpn
        maps = [self.reduce(features)]
        images = self._images(features)
        logits, deltas = rpn.head(maps)
        anchors = rpn.anchor_generator(images, maps)
        per_level = [int(o[0].numel()) for o in logits]
        logits, deltas = concat_box_prediction_layers(logits, deltas)
        proposals = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
        boxes, scores = rpn.filter_proposals(proposals, logits, images.image_sizes, per_level)
        return list(zip(boxes, scores))


@torch.no_grad()
def square_features(model: RetrievalNet, images: Sequence[ImageSource], size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Backbone maps of images resized to size x size.

    Returns:
        ((B, C, h, w) maps, (B, 2) (width, height) of the stored images).
    """
    batch, sizes = [], []
    for src in images:
        img = src if isinstance(src, Image.Image) else load_image(src)
        sizes.append(img.size)
        batch.append(to_tensor(img.resize((size, size), Image.Resampling.BILINEAR)))
    device = next(model.parameters()).device
    x = torch.stack(batch).to(device)
    return model.forward_features(model.normalize(x)), np.asarray(sizes, np.float32).reshape(-1, 2)


def to_square(boxes: np.ndarray, sizes: np.ndarray, size: int) -> np.ndarray:
    """(B, 4) boxes in pixels of images of (B, 2) (width, height) -> pixels of the square."""
    scale = size / np.asarray(sizes, np.float32)
    return (np.asarray(boxes, np.float32) * np.tile(scale, 2)).astype(np.float32)


@torch.no_grad()
def propose(model: RetrievalNet, net: ProposalNet, images: Sequence[ImageSource]
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Proposals of each image: ((R, 4) float32 boxes in pixels of the stored image, (R,) objectness)."""
    net.eval()
    feats, sizes = square_features(model, images, net.image_size)
    out = []
    for (boxes, scores), (w, h) in zip(net.propose(feats), sizes):
        scale = np.array([w, h, w, h], np.float32) / net.image_size
        b = boxes.float().cpu().numpy() * scale
        b = np.minimum(np.maximum(b, 0), [w, h, w, h]).astype(np.float32)
        out.append((b, scores.float().cpu().numpy()))
    return out


def collection_regions(model: RetrievalNet, net: ProposalNet, ids: Sequence[str], images: Sequence[ImageSource],
                       batch_size: int = 8) -> pa.Table:
    """The `regions.parquet` table of a collection (see `raytrieval.retrieval.regions`)."""
    from raytrieval.retrieval.regions import regions_table

    boxes, scores, sizes = [], [], []
    for start in range(0, len(images), batch_size):
        chunk = [img if isinstance(img, Image.Image) else load_image(img) for img in images[start : start + batch_size]]
        for img, (b, s) in zip(chunk, propose(model, net, chunk)):
            keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])  # clipping can flatten a box
            boxes.append(b[keep])
            scores.append(s[keep])
            sizes.append(img.size)
    return regions_table(list(ids), sizes, boxes, scores)


def save_proposal_net(net: ProposalNet, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `rpn.pt` and `rpn.json` into `directory` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, directory / RPN_FILE)
    (directory / RPN_META).write_text(json.dumps({**net.args, **(extra or {})}, indent=2, sort_keys=True))
    return directory


def load_proposal_net(directory: str | Path) -> ProposalNet:
    """A head saved by `save_proposal_net` (weights loaded with `weights_only=True`), in eval mode."""
    directory = Path(directory)
    if not (directory / RPN_META).is_file():
        raise FileNotFoundError(f"rpn: no {RPN_META} in {directory}")
    meta = json.loads((directory / RPN_META).read_text())
    names = ("in_channels", "image_size", "anchor_fractions", "aspect_ratios", "mid_channels", "proposals", "nms_thresh")
    net = ProposalNet(**{k: meta[k] for k in names})
    net.load_state_dict(torch.load(directory / RPN_FILE, map_location="cpu", weights_only=True))
    return net.eval()

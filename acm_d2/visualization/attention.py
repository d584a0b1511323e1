"""ACM attention maps, as in the paper's Fig. 4: where a module's K and Q heads look in an image.

`capture_attention` runs a model's backbone on an image with forward pre-hooks on chosen ACM modules;
each hook asks the module for its own softmax maps (AttendAndCompare.attention_maps, the maths of
layers/acm.py), so what is shown is what the module pools. `select_groups` picks, as the paper does,
the groups whose K or Q map puts the most attention on the ground-truth masks, and `render_attention`
draws the maps over the image with the ground-truth contours.
"""

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch

from ..layers.acm import AttendAndCompare

__all__ = [
    "acm_modules",
    "default_module",
    "resolve_modules",
    "capture_attention",
    "overlap_scores",
    "select_groups",
    "render_attention",
    "short_name",
    "ground_truth_mask",
]

Maps = Dict[str, np.ndarray]  # "K" / "Q" -> G x H x W attention, at the image's resolution


def acm_modules(model: torch.nn.Module) -> "OrderedDict[str, AttendAndCompare]":
    """Every ACM with attention heads (any variant but "p_only") in `model`, by module name, in order.

    A ValueError when there is none, e.g. a model built with MODEL.CONTEXT_MODULE other than "ACM".
    """
    model = getattr(model, "module", model)  # DistributedDataParallel
    found = OrderedDict(
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, AttendAndCompare) and m.use_k
    )
    if not found:
        raise ValueError(
            "the model has no ACM module with attention (K/Q) heads: build it with "
            "MODEL.CONTEXT_MODULE 'ACM' and an ACM variant other than 'p_only'"
        )
    return found


def default_module(names: Sequence[str]) -> str:
    """The last ACM of res4 (stride 16: coarse enough to be global, fine enough to see shapes), else the last."""
    res4 = [n for n in names if ".res4." in f".{n}"]
    return (res4 or list(names))[-1]


def resolve_modules(model: torch.nn.Module, requested: Optional[Sequence[str]]) -> List[str]:
    """Full module names for `requested` (full names, or suffixes such as "res4.1" / "res4.1.context");
    the default module when None or empty. A ValueError lists the ACM names when one matches none."""
    names = list(acm_modules(model))
    if not requested:
        return [default_module(names)]
    resolved = []
    for req in requested:
        req = req[: -len(".context")] if req.endswith(".context") else req
        matches = [
            n
            for n in names
            if n == req or n.endswith("." + req) or n.endswith("." + req + ".context")
        ]
        if len(matches) != 1:
            why = "matches no" if not matches else f"is ambiguous among {len(matches)}"
            raise ValueError(
                f"module {req!r} {why} ACM module; the model's ACM modules are: {', '.join(names)}"
            )
        resolved.append(matches[0])
    return resolved


@torch.no_grad()
def capture_attention(
    model,
    image_bgr: np.ndarray,
    names: Sequence[str],
    min_size: int,
    max_size: int,
    resize: bool = True,
) -> Dict[str, Maps]:
    """The K and Q maps of the ACM modules `names` for one image (H x W x 3 uint8, BGR as cv2 reads it).

    The image is resized as Detectron2 does at test time (shortest edge to min_size, longest at most
    max_size) and normalised by the model; only the backbone runs. Each map (G x h x w at the
    feature's resolution, padding cropped off) is resized to H x W and renormalised to sum to 1;
    with resize=False the maps are returned at the feature's resolution as the module computed them.
    """
    from detectron2.data import transforms as T

    model = getattr(model, "module", model)
    modules = acm_modules(model)
    height, width = image_bgr.shape[:2]
    resized = (
        T.ResizeShortestEdge([min_size, min_size], max_size)
        .get_transform(image_bgr)
        .apply_image(image_bgr)
    )
    tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype("float32"))
    raw: Dict[str, Dict[str, torch.Tensor]] = {}
    hooks = [
        modules[name].register_forward_pre_hook(
            lambda m, inputs, name=name: raw.__setitem__(name, m.attention_maps(inputs[0]))
        )
        for name in names
    ]
    was_training = model.training
    try:
        model.eval()
        images = model.preprocess_image([{"image": tensor}])
        model.backbone(images.tensor)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    padded_h, padded_w = images.tensor.shape[-2:]
    out = {}
    for name, maps in raw.items():
        out[name] = {}
        for head, attn in maps.items():  # 1 x G x h x w
            h, w = attn.shape[-2:]
            valid = attn[
                0,
                :,
                : int(np.ceil(h * resized.shape[0] / padded_h)),
                : int(np.ceil(w * resized.shape[1] / padded_w)),
            ]
            valid = valid.float().cpu().numpy()
            if not resize:
                out[name][head] = valid
                continue
            up = np.stack(
                [cv2.resize(a, (width, height), interpolation=cv2.INTER_LINEAR) for a in valid]
            )
            out[name][head] = up / np.maximum(up.sum(axis=(1, 2), keepdims=True), 1e-12)
    return out


def short_name(name: str) -> str:
    """ "backbone.bottom_up.res4.1.context" -> "res4.1", for titles."""
    return name.replace("backbone.bottom_up.", "").replace(".context", "")


def ground_truth_mask(coco, image_id: int) -> np.ndarray:
    """The union of an image's annotation masks (H x W bool) from a pycocotools COCO object."""
    info = coco.loadImgs(image_id)[0]
    masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
    return np.any(masks, axis=0) if masks else np.zeros((info["height"], info["width"]), bool)


def overlap_scores(maps: Maps, mask: np.ndarray) -> np.ndarray:
    """G scores: for each group, the larger of the K and Q attention mass inside `mask` (H x W bool)."""
    return np.max([(m * mask[None]).sum(axis=(1, 2)) for m in maps.values()], axis=0)


def select_groups(
    maps_per_image: Sequence[Maps], masks: Sequence[np.ndarray], top: int = 1
) -> List[int]:
    """The `top` groups whose K or Q maps overlap the ground-truth masks most, on average over the images
    (the paper's choice for its Fig. 4), best first."""
    scores = np.mean(
        [overlap_scores(maps, mask) for maps, mask in zip(maps_per_image, masks)], axis=0
    )
    return [int(g) for g in np.argsort(-scores, kind="stable")[:top]]


def _overlay(
    image_bgr: np.ndarray, attn: Optional[np.ndarray], mask: Optional[np.ndarray]
) -> np.ndarray:
    """RGB: the image, the attention (normalised to its maximum, jet) blended over it, GT contours in white."""
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    if attn is not None:
        heat = cv2.applyColorMap(
            np.uint8(255 * attn / max(float(attn.max()), 1e-12)), cv2.COLORMAP_JET
        )
        rgb = cv2.addWeighted(rgb, 0.45, cv2.cvtColor(heat, cv2.COLOR_BGR2RGB), 0.55, 0)
    if mask is not None:
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(rgb, contours, -1, (255, 255, 255), 1)
    return rgb


def render_attention(output_png: str, rows: Sequence[Dict], title: str = "") -> None:
    """One figure: a row per entry of `rows`, each a dict with "image" (BGR), "maps" (Maps), "group",
    optional "mask" (H x W bool, drawn as contours) and "label"; columns: the image, K, Q."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    heads = sorted({h for row in rows for h in row["maps"]})
    fig, axes = plt.subplots(
        len(rows), 1 + len(heads), figsize=(2.4 * (1 + len(heads)), 2.5 * len(rows)), squeeze=False
    )
    for r, row in enumerate(rows):
        panels = [(_overlay(row["image"], None, row.get("mask")), row.get("label", "image"))]
        for head in heads:
            attn = row["maps"][head][row["group"]] if head in row["maps"] else None
            panels.append(
                (_overlay(row["image"], attn, row.get("mask")), f"{head}, group {row['group']}")
            )
        for ax, (picture, label) in zip(axes[r], panels):
            ax.imshow(picture)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(output_png, dpi=100)
    plt.close(fig)

"""torchvision's ImageNet ResNet / ResNeXt weights in the key layout of Detectron2's (and acm_d2's) ResNet.

    torchvision                              ours
    conv1.weight                             stem.conv1.weight (input channels reversed for BGR input)
    bn1.{weight,bias,running_mean,running_var}  stem.conv1.norm.*
    layer{1..4}.{i}.conv{j}.weight           res{2..5}.{i}.conv{j}.weight
    layer{1..4}.{i}.bn{j}.*                  res{2..5}.{i}.conv{j}.norm.*
    layer{1..4}.{i}.downsample.0.weight      res{2..5}.{i}.shortcut.weight
    layer{1..4}.{i}.downsample.1.*           res{2..5}.{i}.shortcut.norm.*
    fc.*, *.num_batches_tracked              dropped (the classifier; FrozenBN keeps no counter)

BatchNorm becomes FrozenBN with the same weight, bias and running statistics (both use eps 1e-5).
The converted trunk computes what torchvision's computes, given the input torchvision expects; the
config values that make Detectron2 feed it that input are `torchvision_config(state_dict)`:

- torchvision puts a block's stride in its 3x3 conv: MODEL.RESNETS.STRIDE_IN_1X1 False.
- torchvision takes RGB in [0, 1], normalised by mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225);
  Detectron2 takes 0-255 pixels minus MODEL.PIXEL_MEAN over MODEL.PIXEL_STD, so both are 255 times
  torchvision's. With input_format "BGR" (the default, as every other config here) the first conv's
  input channels are reversed and the mean/std are given in BGR order; with "RGB" they are kept and
  INPUT.FORMAT must be "RGB" (what Detectron2's own tools/convert-torchvision-to-d2.py does).
- depth, NUM_GROUPS, WIDTH_PER_GROUP and RES2_OUT_CHANNELS are read from the tensors' shapes.
"""

import re
from typing import Dict, List

import torch

__all__ = [
    "convert_torchvision_state_dict",
    "torchvision_config",
    "TORCHVISION_PIXEL_MEAN_RGB",
    "TORCHVISION_PIXEL_STD_RGB",
]

# torchvision's ImageNet normalisation in Detectron2's 0-255 pixel units, RGB order.
TORCHVISION_PIXEL_MEAN_RGB = [123.675, 116.28, 103.53]  # 255 * (0.485, 0.456, 0.406)
TORCHVISION_PIXEL_STD_RGB = [58.395, 57.12, 57.375]  # 255 * (0.229, 0.224, 0.225)
INPUT_FORMATS = ("BGR", "RGB")

_DEPTHS = {
    (2, 2, 2, 2, False): 18,
    (3, 4, 6, 3, False): 34,
    (3, 4, 6, 3, True): 50,
    (3, 4, 23, 3, True): 101,
    (3, 8, 36, 3, True): 152,
}
_STEM = re.compile(r"^(conv1\.weight|bn1\.(weight|bias|running_mean|running_var))$")
_BLOCK = re.compile(
    r"^layer([1-4])\.(\d+)\.(conv[1-3]\.weight|bn[1-3]\.(weight|bias|running_mean|running_var)|"
    r"downsample\.0\.weight|downsample\.1\.(weight|bias|running_mean|running_var))$"
)
_DROPPED = re.compile(r"^fc\.(weight|bias)$|(^|\.)num_batches_tracked$")


def _rename(key: str) -> str:
    if _STEM.match(key):
        return "stem." + key.replace("bn1.", "conv1.norm.")
    m = _BLOCK.match(key)
    rest = m.group(3)
    rest = re.sub(r"^bn([1-3])\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"res{int(m.group(1)) + 1}.{m.group(2)}.{rest}"


def _check_input_format(input_format: str) -> None:
    if input_format not in INPUT_FORMATS:
        raise ValueError(
            f"input_format = {input_format!r} is invalid; allowed: {list(INPUT_FORMATS)}"
        )


def convert_torchvision_state_dict(
    state_dict: Dict[str, torch.Tensor], input_format: str = "BGR"
) -> Dict[str, torch.Tensor]:
    """Rename a torchvision ResNet / ResNeXt state dict to Detectron2's ResNet keys (stem.*, res2.* ...).

    Every trunk tensor is kept (copied); fc and the BN counters are dropped. A key that is neither is a
    ValueError naming it (not a torchvision ResNet). input_format "BGR" reverses the first conv's input
    channels so that BGR images can be fed (see the module docstring for the matching config).
    """
    _check_input_format(input_format)
    converted = {}
    for key, value in state_dict.items():
        if _DROPPED.search(key):
            continue
        if not (_STEM.match(key) or _BLOCK.match(key)):
            raise ValueError(
                f"unknown key {key!r}: not a parameter of a torchvision ResNet / ResNeXt trunk"
            )
        value = value.detach().clone()
        if key == "conv1.weight" and input_format == "BGR":
            value = value.flip(1)
        converted[_rename(key)] = value
    if "stem.conv1.weight" not in converted:
        raise ValueError("no conv1.weight: is this a torchvision ResNet state dict?")
    return converted


def torchvision_config(state_dict: Dict[str, torch.Tensor], input_format: str = "BGR") -> List:
    """The config options (a list for cfg.merge_from_list) under which Detectron2 runs the trunk of this
    torchvision state dict (torchvision's key layout) as torchvision does."""
    _check_input_format(input_format)
    blocks = [
        1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{i}."))
        for i in range(1, 5)
    ]
    bottleneck = "layer1.0.conv3.weight" in state_dict
    depth = _DEPTHS.get((*blocks, bottleneck))
    if depth is None:
        raise ValueError(
            f"blocks per stage {blocks} ({'bottleneck' if bottleneck else 'basic'}) is no ResNet depth"
        )
    conv2 = state_dict["layer1.0.conv2.weight"]  # width x width / groups x 3 x 3
    width, groups = conv2.shape[0], conv2.shape[0] // conv2.shape[1]
    res2_out = state_dict["layer1.0.conv3.weight" if bottleneck else "layer1.0.conv2.weight"].shape[
        0
    ]
    order = slice(None, None, -1) if input_format == "BGR" else slice(None)
    return [
        "MODEL.RESNETS.DEPTH",
        depth,
        "MODEL.RESNETS.NUM_GROUPS",
        groups,
        "MODEL.RESNETS.WIDTH_PER_GROUP",
        width // groups if bottleneck else 64,
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        res2_out,
        "MODEL.RESNETS.STRIDE_IN_1X1",
        False,
        "MODEL.PIXEL_MEAN",
        TORCHVISION_PIXEL_MEAN_RGB[order],
        "MODEL.PIXEL_STD",
        TORCHVISION_PIXEL_STD_RGB[order],
        "INPUT.FORMAT",
        input_format,
    ]

"""The training/test mapper: Detectron2's DatasetMapper, reading images through `read_image`, which scales
16-bit grayscale images (X-rays, the paper's domain) to 8 bits instead of saturating them, and names
the file when an image cannot be read; and the choice of its mask format from the data."""

import copy
import logging

import numpy as np
import torch
from detectron2.data import DatasetMapper as _DatasetMapper
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

from ..compat import transform_annotations

__all__ = ["read_image", "ImageTooLargeError", "DatasetMapper", "instance_mask_format"]

logger = logging.getLogger(__name__)

# Pillow opens a 16-bit grayscale PNG or TIFF in one of these modes (a 16-bit RGB PNG it already reduces
# to 8-bit "RGB"). Detectron2's read_image converts them with Image.convert, which clips every value
# above 255: an X-ray arrives as an all-white image.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8_bits(image: Image.Image, file_name: str) -> Image.Image:
    values = np.asarray(image)
    if values.min() < 0 or values.max() > 65535:
        raise ValueError(
            f"{file_name}: {image.mode} image with values in [{values.min()}, {values.max()}], outside 16 bits; "
            "convert it to an 8- or 16-bit PNG"
        )
    # The full 16-bit range onto 0-255 (65535 / 257 = 255), as ImageMagick and OpenCV convert.
    return Image.fromarray(np.round(values / 257.0).astype(np.uint8), mode="L")


class ImageTooLargeError(ValueError):
    """An image with more pixels than the reader was allowed to decode."""


def read_image(file_name: str, format=None, max_pixels=None) -> np.ndarray:
    """detection_utils.read_image(file_name, format), except that a 16-bit grayscale image is scaled to
    8 bits first, and that a file it cannot read raises an OSError naming the file. With `max_pixels`, an
    image of more pixels is refused from its header, before it is decoded (ImageTooLargeError): a small
    compressed file can decode to gigabytes."""
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageTooLargeError(
                    f"{file_name}: {image.width} x {image.height} = {image.width * image.height} pixels, over "
                    f"the limit of {max_pixels}"
                )
            if image.mode in SIXTEEN_BIT_MODES:
                # ImageOps.exif_transpose: Detectron2's EXIF handling, minus its workaround for Pillow < 6.
                return utils.convert_PIL_to_numpy(
                    _to_8_bits(ImageOps.exif_transpose(image), file_name), format
                )
        return utils.read_image(file_name, format)
    except (
        OSError
    ) as e:  # PIL's "cannot identify image file", "image file is truncated", a missing file
        raise OSError(
            f"{file_name}: cannot read the image ({e}); replace the file or remove its record, or "
            "find all such files up front with --check-images"
        ) from e


class DatasetMapper(_DatasetMapper):
    """Detectron2's DatasetMapper with the image read through `read_image`. The body is Detectron2's
    __call__, whose image reading has no hook of its own."""

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        if "sem_seg_file_name" in dataset_dict:
            # Labels, not intensities: Detectron2's read, unscaled.
            sem_seg_gt = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        else:
            sem_seg_gt = None
        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            transform_annotations(self, dataset_dict, transforms, image_shape)
        return dataset_dict


def _sources(dataset_names) -> str:
    files = [MetadataCatalog.get(n).get("json_file", None) for n in dataset_names]
    return ", ".join(f"{n!r} ({f})" if f else repr(n) for n, f in zip(dataset_names, files))


def instance_mask_format(cfg, dataset_dicts, dataset_names) -> str:
    """The mask format the training mapper needs for these dataset dicts: cfg.INPUT.MASK_FORMAT, or
    "bitmask" (logged) when it is "polygon" and some instance has an RLE mask, which Detectron2's
    PolygonMasks cannot hold (every step would fail). With MODEL.MASK_ON, an instance without a
    segmentation is a ValueError naming the datasets, the count and the fix (the mask head would fail
    at its first step). Crowd annotations are not trained on, so they are not counted."""
    rle, without_mask, total = 0, 0, 0
    example = None
    for d in dataset_dicts:
        for ann in d.get("annotations", ()):
            if ann.get("iscrowd", 0):
                continue
            total += 1
            segmentation = ann.get("segmentation")
            if segmentation is None:
                without_mask += 1
                example = example or d["file_name"]
            elif isinstance(segmentation, dict):
                rle += 1
    mask_format = cfg.INPUT.MASK_FORMAT
    if not cfg.MODEL.MASK_ON:
        return mask_format
    if without_mask:
        raise ValueError(
            f"MODEL.MASK_ON is True, but {without_mask} of the {total} annotations in the training data "
            f"{_sources(dataset_names)} have no 'segmentation' (e.g. in {example}); set MODEL.MASK_ON False to "
            "train a detector without masks, or add masks to those annotations"
        )
    if rle and mask_format == "polygon":
        logger.info(
            f"{rle} of the {total} training annotations in {_sources(dataset_names)} have RLE masks: "
            "using INPUT.MASK_FORMAT bitmask instead of polygon"
        )
        return "bitmask"
    return mask_format

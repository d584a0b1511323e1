"""Registering COCO-format datasets given on the command line (`--coco-dataset NAME JSON IMAGE_ROOT`)."""

import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from .validate import load_validated_coco_json

__all__ = ["register_coco_dataset"]


def register_coco_dataset(
    name: str, json_file: str, image_root: str, check_images: Optional[bool] = None
) -> None:
    """Register a COCO-format instance dataset under `name` (for DATASETS.TRAIN / DATASETS.TEST).

    Registering the same name with the same files again is a no-op (DDP workers re-run it); a name
    already taken by other files, or a missing file or folder, is a ValueError that says which.
    The annotations are checked when the dataset is first loaded (acm_d2.data.validate): a malformed
    file is an error naming the file and record; unusable records are dropped and logged. check_images:
    also open every image file's header (None: for files of up to AUTO_CHECK_MAX_IMAGES images).
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"--coco-dataset {name}: annotation file {json_file!r} does not exist"
        )
    if not os.path.isdir(image_root):
        raise FileNotFoundError(
            f"--coco-dataset {name}: image folder {image_root!r} does not exist"
        )
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("json_file") == json_file and meta.get("image_root") == image_root:
            return
        raise ValueError(
            f"--coco-dataset {name}: the name is already registered (to {meta.get('json_file')!r}); pick another name"
        )
    # As Detectron2's register_coco_instances, with the validating loader.
    DatasetCatalog.register(
        name, lambda: load_validated_coco_json(json_file, image_root, name, check_images)
    )
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")

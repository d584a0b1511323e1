"""acm_d2.compat holds every private Detectron2/fvcore internal acm_d2 uses; these fail, naming the
internal, when an upgrade moves one or when new code reaches past compat.py."""

import pathlib
import re

from acm_d2 import compat

REPO = pathlib.Path(__file__).resolve().parents[1]
# Private attributes of Detectron2 / fvcore objects that acm_d2 needs; only compat.py may name them.
PRIVATE = re.compile(
    r"\._infinite_indices|\._seed\b|\._history\b|\._global_avg|\._count\b|_train_loader_from_config|"
    r"\._parsed_url_during_load|\._transform_annotations|\._obj_map|self\._trainer\b"
)


def test_every_private_internal_still_exists():
    assert compat.check() == []


def test_no_private_detectron2_access_outside_compat():
    offending = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in sorted([*REPO.glob("acm_d2/**/*.py"), *REPO.glob("tools/*.py")])
        if path.name != "compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert offending == []
    assert {name for _, name, _ in compat.OVERRIDDEN} == {
        "_load_file",
        "_torch_load",
        "_load_model",
        "_write_metrics",
    }

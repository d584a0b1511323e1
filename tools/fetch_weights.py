#!/usr/bin/env python
"""Fetch ahead the weights that configs download when a run starts, for a machine without internet.

    python tools/fetch_weights.py --cache weights-cache                  # every config in configs/
    python tools/fetch_weights.py --cache weights-cache configs/COCO-Detection/retinanet_acm_R_50_FPN_1x.yaml
    python tools/fetch_weights.py --cache weights-cache detectron2://ImageNetPretrained/MSRA/R-50.pkl

Then copy the folder to the cluster and run there with FVCORE_CACHE=<the folder>: Detectron2 finds
each file where it looks before downloading, so no run needs the network.

Each remote MODEL.WEIGHTS (YAML configs, with their _BASE_) or train.init_checkpoint (Python
configs) is fetched with Detectron2's own PathManager.get_local_path, as a run fetches it, into
the iopath cache (FVCORE_CACHE, set here from --cache): the files land under the names a run looks
up, e.g. detectron2://ImageNetPretrained/MSRA/R-50.pkl in <cache>/detectron2/ImageNetPretrained/MSRA/.
Local weights are listed, not copied: bring those along yourself.
"""

import argparse
import os
import sys
from pathlib import Path

from detectron2.config import CfgNode, LazyConfig

REPO = Path(__file__).resolve().parent.parent


def config_weights(path):
    """The weights file a config names (MODEL.WEIGHTS or train.init_checkpoint), "" when none."""
    if str(path).endswith(".py"):
        return LazyConfig.load(str(path)).train.get("init_checkpoint", "") or ""
    return CfgNode.load_yaml_with_base(str(path)).get("MODEL", {}).get("WEIGHTS", "") or ""


def weights_to_fetch(sources):
    """{weights: [the configs that name it]} for `sources`: config files, or weights URLs/paths."""
    found = {}
    for source in sources:
        if "://" in source:
            found.setdefault(source, []).append("the command line")
            continue
        if not os.path.isfile(source):
            raise SystemExit(f"error: {source} is neither a config file nor a URL of weights")
        weights = config_weights(source)
        if weights:
            found.setdefault(weights, []).append(source)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sources",
        nargs="*",
        help="config files (.yaml, .py) or weights URLs (default: every config in configs/)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        required=True,
        help="folder to fetch into (new or existing); on the cluster, set FVCORE_CACHE to it",
    )
    args = parser.parse_args(argv)
    sources = args.sources or sorted(
        str(p) for p in (REPO / "configs").rglob("*") if p.suffix in (".yaml", ".py")
    )
    found = weights_to_fetch(sources)
    args.cache.mkdir(parents=True, exist_ok=True)
    # iopath reads FVCORE_CACHE at each lookup: Detectron2's handlers then cache into the folder.
    os.environ["FVCORE_CACHE"] = str(args.cache.resolve())
    from detectron2.utils.file_io import PathManager

    failed = []
    for weights, users in sorted(found.items()):
        if "://" not in weights:
            print(f"local, not copied (bring it along): {weights} (named by {users[0]})")
            continue
        try:
            local = PathManager.get_local_path(weights)
        except Exception as error:  # the host is unreachable, or the file is not there
            failed.append(weights)
            print(
                f"error: cannot fetch {weights}: {type(error).__name__}: {error}", file=sys.stderr
            )
            continue
        size = os.path.getsize(local) / 2**20
        print(f"{weights} -> {os.path.relpath(local, args.cache)} ({size:.1f} MiB)")
    if failed:
        raise SystemExit(
            f"error: {len(failed)} of the weights could not be fetched (listed above): run this on a "
            "machine that reaches their host"
        )
    print(
        f"copy {args.cache} to the cluster and run there with FVCORE_CACHE=<its path there> (a "
        "folder the run can write to: iopath takes a lock file beside each file)"
    )


if __name__ == "__main__":
    main()

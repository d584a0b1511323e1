#!/usr/bin/env python
"""Train or evaluate a Detectron2 model with an ACM backbone (or any Detectron2 model).

python tools/train_net.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml --num-gpus 8
python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
python tools/train_net.py --config-file ... --coco-dataset my_train train.json images/ DATASETS.TRAIN '("my_train",)'
"""

from detectron2.evaluation import verify_results
from detectron2.utils import comm

import acm_d2  # noqa: F401  (registers the backbones and meta-architectures, also in spawned workers)
from acm_d2.engine import (
    Trainer,
    argument_parser,
    launch_from_args,
    load_weights_for_evaluation,
    register_datasets,
    setup,
)


def main(args):
    register_datasets(args)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_weights_for_evaluation(model, cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR, args)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch_from_args(main, args)


if __name__ == "__main__":
    invoke_main()

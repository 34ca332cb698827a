"""Which architecture, which init, which blocks train: a look before a training run.

python -m training.model --arch efficientnet_lite0 --unfreeze 5
"""

from __future__ import annotations

import argparse
import logging
import sys

from carmodel import models
from training import config as config_lib


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_arguments(parser)
    parser.add_argument("--num_classes", type=int, default=196)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_lib.from_args(args)
    try:
        model, init = models.build_model(
            cfg.model.arch, args.num_classes, cfg.finetune.pretrained, cfg.model.dropout, locate=cfg.model.localizes
        )
    except models.PretrainedWeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    frozen = models.freeze(model, cfg.model.arch, cfg.finetune.unfreeze)
    total, trainable = models.count_parameters(model)
    blocks = len(models.spec(cfg.model.arch).blocks(models.base_net(model)))
    print(
        f"{cfg.model.arch}: init={init} params={total:,} trainable={trainable:,} "
        f"blocks={blocks} frozen_blocks={len(frozen)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

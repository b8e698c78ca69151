"""Resume a run (exactly or resharded) and commit the loaded state at once, without training a step.

    torchrun --nproc_per_node N -m tests.reshard_probe --config X --set ...

The committed checkpoint (``step_<N>.1``) holds exactly what the trainer loaded, so a test can compare
it with the checkpoint it was loaded from.
"""

from __future__ import annotations

import argparse

from pretrain.config import load_config
from pretrain.engine.distributed import destroy, init_distributed
from pretrain.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    ctx = init_distributed(300)
    trainer = Trainer(cfg, ctx)
    try:
        assert trainer.resumed_from is not None, "nothing to resume"
        trainer.save(blocking=True)
    finally:
        trainer.close()
        destroy()


if __name__ == "__main__":
    main()

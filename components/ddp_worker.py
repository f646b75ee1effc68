"""One torchrun worker (components/distributed.py explains the whole path): `python -m components.ddp_worker SPEC`.

Joins the process group, builds the spec's model from the same seed as every other rank and trains it with
`components.stages._fit_backbone` (train.fit under DistributedDataParallel). It writes nothing but rank 0's
checkpoint; the stage that launched it does the rest.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from components.distributed import Launch, process_group, set_launch


def worker(spec_path: Path) -> None:
    """One torchrun worker: train the spec's model (components.stages._fit_backbone) as one rank of the group."""
    from components import stages
    from components.config import TrainConfig
    from components.device import place, set_placement
    from components.paths import Paths

    spec = json.loads(Path(spec_path).read_text())
    rt = spec["runtime"]
    set_launch(Launch(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), rt["backend"], bool(rt["sync_batchnorm"])))
    stages.set_threads(int(rt["threads"]))
    with process_group(rt["backend"], rt["device"]) as r:
        if not r.main:
            os.environ["MIXBCT_PROGRESS"] = "0"  # one bar, rank 0's
        set_placement(place(rt["device"], rt["precision"], rt["channels_last"], rt.get("compile", False)))
        cfg = TrainConfig.model_validate(spec["train"])
        stages._fit_backbone(cfg, int(spec["image_size"]), Paths(Path(spec["root"])), spec["role"], spec["method"])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank " + os.environ.get("RANK", "?") + " %(message)s")
    worker(Path(sys.argv[1]))

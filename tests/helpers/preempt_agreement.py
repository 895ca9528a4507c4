"""Run under `torchrun --nproc_per_node=2 tests/helpers/preempt_agreement.py OUT.json`.

Only rank 1 gets SIGUSR1 (sent to itself after its step 3); both ranks must still stop
after the same step: the next multiple of check_every."""
import json
import os
import signal
import sys

import torch.distributed as tdist

from fastcls.dist import setup_distributed
from fastcls.preempt import Preemption

info = setup_distributed("cpu")
stopped_at = None
with Preemption(info, check_every=4) as stop:
    for i in range(100):
        if info.rank == 1 and i == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        if stop.agreed(i):
            stopped_at = i
            break
    got = stop.requested
out = [None] * info.world_size
tdist.all_gather_object(out, {"rank": info.rank, "stopped_at": stopped_at, "signal": got})
if info.rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
tdist.barrier()  # nobody tears gloo down while a peer still works (seen: SIGABRT in rank 1)
tdist.destroy_process_group()

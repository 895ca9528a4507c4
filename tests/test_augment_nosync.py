"""The whole chain issues no op that syncs the host with an accelerator (checked on the CPU by
tracing the aten ops it dispatches): no .item()/.tolist(), no nonzero or boolean-mask indexing,
no tensors built from Python data once warm (a blocking host->device copy on CUDA)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastcls.augment import build_augmenter
from fastcls.augment import policy as P
from fastcls.config import load_config

SYNCING = {"nonzero", "_local_scalar_dense", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
           "is_nonzero", "equal", "allclose", "masked_scatter_", "nonzero_static"}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.bool_index = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        self.ops.append(name)
        if name in ("index", "index_put", "index_put_"):
            idx = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (idx or [])):
                self.bool_index.append(name)
        return func(*args, **(kwargs or {}))


def test_full_chain_has_no_syncing_ops(monkeypatch):
    monkeypatch.setattr(P, "SKIP_UNUSED_ON_CPU", False)  # the accelerator code path
    over = ["data.batch_size=8", "augment.label_smoothing=0.1", "augment.mixup.mixup_alpha=0.8",
            "augment.mixup.cutmix_alpha=1.0", "augment.mixup.mode=elem", "augment.mixup.cutmix_minmax=[0.2,0.6]"]
    over += [f"augment.{k}.enabled=true" for k in ("autoaugment", "randaugment", "cutout", "random_erasing",
                                                    "gridmask", "hide_and_seek")]
    over += ["augment.randaugment.magnitude_std=0.5", "augment.random_erasing.fill=pixel", "augment.gridmask.rotate=30"]
    aug = build_augmenter(load_config(None, over).augment, 10)
    x = torch.randn(8, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    aug(x, y, 0, 0)  # warm: cached constant tensors get built once
    log = OpLog()
    with log:
        out, t = aug(x, y, 0, 1)
    assert out.shape == x.shape and t.shape == (8, 10)
    assert not (set(log.ops) & SYNCING), set(log.ops) & SYNCING
    assert not log.bool_index, log.bool_index
    assert "lift_fresh" not in log.ops   # torch.tensor(python data) every step
    assert {"grid_sampler_2d", "_standard_gamma", "scatter_add_"} <= set(log.ops)  # the log saw the real work

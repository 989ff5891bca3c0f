"""EMA of the UNet's fp32 master weights, sharded like them: each rank averages only the slice of each parameter
whose fp32 master its ZeRO optimizer holds (ZeRO-1/2: flat-partition fragments; ZeRO-3: the parameter partition).

Why not a full copy of the module parameters per rank: under bf16 those are the 16-bit copies (an EMA of rounded
weights), and a full fp32 shadow of the 2.6 B-parameter SDXL UNet is 10 GB on every GPU; a slice is 10 GB / W and needs
no communication per step. The whole EMA is assembled only for the export (a collective) and is saved per rank.

DeepSpeed has a public per-partition accessor for ZeRO-3 only; the ZeRO-1/2 fragment (``param._hp_mapping``) is
private and is read through raydiff.compat alone (`_fragment`), checked against the DeepSpeed versions it was
written for.
"""

from __future__ import annotations

import glob
import os

import torch
import torch.distributed as dist

from raydiff import compat
from raydiff.compat import DEEPSPEED_CHECKED, deepspeed_checked

EMA_SHARD = "ema_rank{}.pt"  # one per rank: {"world", "numel": {name: n}, "slices": {name: (start, fp32 tensor)}}
LEGACY_EMA = "ema_unet.pt"  # a whole {name: tensor} shadow written by rank 0 (checkpoints from before sharding)


def _check_deepspeed_version() -> None:
    if not deepspeed_checked():
        import deepspeed  # here: only for its version, in the error

        raise RuntimeError(f"raydiff's sharded EMA reads DeepSpeed's private ZeRO-1/2 fragment map, checked on "
                           f"DeepSpeed {DEEPSPEED_CHECKED} [from, to); found {deepspeed.__version__}. Run "
                           "tests/test_ema.py against it and widen raydiff.compat.DEEPSPEED_CHECKED.")


def _fragment(param: torch.nn.Parameter, rank: int) -> tuple[int, torch.Tensor] | None:
    """(start in the flattened parameter, live fp32 master slice) this rank's optimizer holds, or None."""
    if hasattr(param, "ds_id"):  # ZeRO-3: partition r holds elements [r * n, (r + 1) * n), the last one padded
        from deepspeed.utils import safe_get_local_fp32_param  # here: engines exist, so DeepSpeed is imported

        local = safe_get_local_fp32_param(param).view(-1)
        start = rank * local.numel()
        numel = max(0, min(local.numel(), param.ds_numel - start))
        return (start, local[:numel]) if numel else None
    if compat.has_fragment_map(param):  # ZeRO-1/2 (and bf16): a piece of this rank's flat fp32 partition, or none
        return compat.fragment(param)
    if param.dtype == torch.float32:  # ZeRO-0 fp32: the module is the master
        return (0, param.detach().view(-1)) if rank == 0 else None
    return None  # this rank's partition holds no part of this parameter


class ShardedEMA:
    """``shadow <- decay * shadow + (1 - decay) * master`` on this rank's slices, after every optimizer step."""

    def __init__(self, engine, decay: float):
        _check_deepspeed_version()
        self.decay = decay
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.params = dict(engine.module.named_parameters())
        self.numel = {n: (p.ds_numel if hasattr(p, "ds_id") else p.numel()) for n, p in self.params.items()}
        self.slices = {n: (start, live.detach().float().clone()) for n, (start, live) in self._masters()}

    def _masters(self):
        """(name, (start, live fp32 slice)), looked up each time: a checkpoint load may replace the partitions."""
        for name, param in self.params.items():
            if (found := _fragment(param, self.rank)) is not None:
                yield name, found

    @torch.no_grad()
    def update(self) -> None:
        for name, (_, live) in self._masters():
            self.slices[name][1].lerp_(live.float(), 1.0 - self.decay)

    # ------------------------------------------------------------ checkpoint

    def save(self, ckpt_dir: str) -> None:
        torch.save({"world": self.world, "numel": self.numel,
                    "slices": {n: (s, t.cpu()) for n, (s, t) in self.slices.items()}},
                   os.path.join(ckpt_dir, EMA_SHARD.format(self.rank)))

    def load(self, ckpt_dir: str) -> bool:
        """Take this rank's slices from the saved shards, whatever world size wrote them (or from a whole legacy
        shadow). Reads the files memory-mapped: only the bytes of the slices this rank needs are paged in."""
        own = os.path.join(ckpt_dir, EMA_SHARD.format(self.rank))
        saved = torch.load(own, mmap=True, weights_only=True) if os.path.exists(own) else None
        if saved is not None and saved["world"] == self.world:  # the same layout: this rank's own shard holds it all
            sources = [{name: [piece] for name, piece in saved["slices"].items()}]
        else:
            sources = _saved_pieces(ckpt_dir)
        if sources is None:
            return False
        for name, (start, tensor) in self.slices.items():
            tensor.copy_(_read_range(sources, name, start, tensor.numel()))
        return True

    # ------------------------------------------------------------ export

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole EMA, shaped like the module's parameters, on rank 0 (None elsewhere). Collective."""
        out = {}
        for name, param in self.params.items():
            device = self.slices[name][1].device if name in self.slices else param.device
            full = torch.zeros(self.numel[name], dtype=torch.float32, device=device)
            if name in self.slices:
                start, tensor = self.slices[name]
                full[start:start + tensor.numel()] = tensor
            if self.world > 1:
                dist.reduce(full, dst=0)  # slices are disjoint: the sum is the whole tensor
            if self.rank == 0:
                out[name] = full.cpu().view(_shape(param))
        return out if self.rank == 0 else None


def saved_state_dict(ckpt_dir: str, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The whole EMA a checkpoint holds, from all its ranks' shards (for tools and tests; a run uses `load`)."""
    sources = _saved_pieces(ckpt_dir)
    if sources is None:
        raise FileNotFoundError(f"{ckpt_dir} holds no EMA ({EMA_SHARD.format('*')} or {LEGACY_EMA})")
    return {name: _read_range(sources, name, 0, shape.numel()).view(shape) for name, shape in shapes.items()}


def _shape(param: torch.nn.Parameter) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_id") else param.shape


def _saved_pieces(ckpt_dir: str) -> list[dict] | None:
    """Every saved piece as {name: [(start, tensor), ...]}; None when the checkpoint has no EMA."""
    shards = sorted(glob.glob(os.path.join(ckpt_dir, EMA_SHARD.format("*"))))
    if shards:
        pieces: dict[str, list] = {}
        for path in shards:
            for name, piece in torch.load(path, mmap=True, weights_only=True)["slices"].items():
                pieces.setdefault(name, []).append(piece)
        return [pieces]
    legacy = os.path.join(ckpt_dir, LEGACY_EMA)
    if os.path.exists(legacy):
        whole = torch.load(legacy, mmap=True, weights_only=True, map_location="cpu")
        return [{name: [(0, t.reshape(-1))] for name, t in whole.items()}]
    return None


def _read_range(sources: list[dict], name: str, start: int, numel: int) -> torch.Tensor:
    """Elements [start, start + numel) of the flattened parameter `name`, from the saved pieces that cover them."""
    out = torch.empty(numel, dtype=torch.float32)
    covered = 0
    for pieces in sources:
        for piece_start, tensor in pieces.get(name, []):
            lo, hi = max(start, piece_start), min(start + numel, piece_start + tensor.numel())
            if lo < hi:
                out[lo - start:hi - start] = tensor[lo - piece_start:hi - piece_start]
                covered += hi - lo
    if covered != numel:
        raise RuntimeError(f"EMA checkpoint covers {covered} of {numel} elements of {name} [{start}, {start + numel})")
    return out

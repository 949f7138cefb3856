"""Processes: rank, world size and the collectives the trainer needs (trivial in a single process).

Under ``accelerate launch`` (or ``torchrun``) each process takes ``prompts_per_step / world`` whole prompt
groups (a group never straddles processes, so the per-group softmax is local), generates their rollouts
with the rows' global Philox keys, and backpropagates the sum of its groups' losses; gradients are then
summed over processes, which is exactly the one-process gradient of the whole batch. Only the main process
writes the run directory.
"""

from __future__ import annotations

import os

import torch

from dmpo_fast.config import TrainConfig


class Processes:
    """Rank, world size and the three collectives the loop needs; trivial in a single process."""

    def __init__(self, cfg: TrainConfig):
        from dmpo_fast import sharding

        self.rank, self.world, self.reshard_after_forward = 0, 1, True
        _refuse_deepspeed()
        self.fsdp = sharding.requested(cfg)
        if _launched_distributed():
            from accelerate import PartialState

            # On a machine without CUDA, device=auto means CPU processes (gloo): asking accelerate for GPUs
            # there gives every process rank 0 of 1, independent copies writing one run directory.
            cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
            state = PartialState(cpu=cpu)
            self.rank, self.world = state.process_index, state.num_processes
            launched = int(os.environ["WORLD_SIZE"])
            if self.world != launched:
                raise ValueError(
                    f"the launcher started {launched} processes (WORLD_SIZE) but they did not form one process "
                    f"group (accelerate sees {self.world}; device={cfg.device!r}): set device=cpu for CPU "
                    "processes, or launch one process per GPU"
                )
            self.device = torch.device("cpu") if state.device.type == "cpu" else state.device
        else:
            self.device = resolve_device(cfg)
        if cfg.prompts_per_step % self.world:
            raise ValueError(
                f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the number of processes "
                f"({self.world}): each process takes whole prompt groups"
            )
        if self.fsdp:
            sharding.check_launch(self.world)
            self.reshard_after_forward = sharding.reshard_after_forward(cfg)
            self.fsdp = self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Wait for every process, then tear the process group down: left to interpreter exit, gloo's
        threads can abort the process ("terminate called without an active exception") after a finished run."""
        import torch.distributed as dist

        if self.world > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def sum_gradients(self, params) -> None:
        if self.world == 1 or self.fsdp:  # FSDP's reduce-scatter has summed them already
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate the processes' equal-length tensors along dim 0 (rank order)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        flag = t.dtype == torch.bool  # gloo has no bool collectives
        t = t.to(torch.uint8) if flag else t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        out = torch.cat(parts)
        return out.bool() if flag else out

    def gather_objects(self, obj) -> list:
        """Every process's ``obj`` (any picklable value), in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()


def _refuse_deepspeed() -> None:
    """``accelerate launch`` with a DeepSpeed config asks for DeepSpeed's engine, which the trainer does not
    use; refuse rather than silently replicate a model the user meant to shard, and name what does the same."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() in ("1", "true", "yes"):
        raise ValueError(
            "accelerate was launched with DeepSpeed (ACCELERATE_USE_DEEPSPEED=true), which the trainer does not "
            "use. For ZeRO-3 launch with configs/accelerate/fsdp.yaml, for ZeRO-2 with "
            "configs/accelerate/fsdp_zero2.yaml (PyTorch FSDP2, the same memory split: see "
            "dmpo_fast.sharding), or set fsdp=true under torchrun; configs/accelerate/ddp.yaml replicates."
        )


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but CUDA is not available; use device=cpu or auto")
    return torch.device(cfg.device)

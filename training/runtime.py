"""Where the training loop runs: Ray Train, torchrun, or this one process (principle 6).

The loop never asks which launcher started it; it asks its runtime: rank, world size and device; the
process group; the token shards of a split; the checkpoint to continue from after a restart; the folder a
checkpoint is written to; and whether to stop at this step boundary. Three runtimes answer:

    RayTrain    a TorchTrainer worker: ranks from ray.train.get_context(), restarts from
                ray.train.get_checkpoint(), checkpoints in a local temporary folder that
                ray.train.report uploads, stop on SIGTERM or Ray Train's preemption notice.
    Torchrun    a torchrun process: ranks from the environment, step_* folders under storage_dir
                (a restart continues from the newest complete one).
    InProcess   one process, world size 1, no launcher (a Ray Tune trial that is not a TorchTrainer, a
                notebook, a test); checkpoints like Torchrun, or in temporary folders without storage_dir.

Every runtime reads token rows the same way: each rank straight from the curated folder's shard files
(training/data.py TokenShards), only the rows of its own batches; nothing passes through the driver.

A stop request (the first SIGTERM, or a preemption notice) is read at the next step boundary, and every
rank agrees on it with one all-reduce, so all ranks checkpoint the same step.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from raylm.training import checkpoint as ckpt
from raylm.training.data import TokenShards


class StopRequest:
    """Set by SIGTERM (or a preemption notice); read at the next step boundary."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


class Runtime:
    """The parts the runtimes share: the process group through DeepSpeed, rows read from the token
    shards, step_* checkpoint folders under storage_dir, and SIGTERM caught on the main thread."""

    def __init__(self, storage_dir: str | None = None, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.storage_dir = storage_dir
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = torch.device("cpu")
        self.stop = StopRequest()
        self._restore_sigterm: Any = None

    # ---- setup and cleanup -------------------------------------------------------------------------
    def start(self, use_gpu: bool) -> None:
        """Device, stop request and process group, in that order. DeepSpeed picks its accelerator from
        DS_ACCELERATOR when it is first imported, so this runs before anything imports deepspeed."""
        if not use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["RANK"] = str(self.rank)  # core.metrics.log_rank0 reads it
        self.device = self.pick_device(use_gpu)
        if use_gpu:
            torch.cuda.set_device(self.device)
        self.watch_stop()
        self.init_process_group(use_gpu)

    def pick_device(self, use_gpu: bool) -> torch.device:
        return torch.device("cuda", self.local_rank) if use_gpu else torch.device("cpu")

    def watch_stop(self) -> None:
        self._restore_sigterm = catch_sigterm(self.stop)

    def init_process_group(self, use_gpu: bool) -> None:
        import deepspeed

        # torchrun leaves the group to the program; Ray Train (and InProcess) have created it already.
        backend = dist.get_backend() if dist.is_initialized() else ("nccl" if use_gpu else "gloo")
        deepspeed.init_distributed(dist_backend=backend)

    def close(self) -> None:
        """Undo what start() did to this process that would outlive the run (the SIGTERM handler)."""
        if self._restore_sigterm is not None:
            self._restore_sigterm()
            self._restore_sigterm = None

    # ---- data and checkpoints ----------------------------------------------------------------------
    def dataset(self, split: str, data_dir: str) -> TokenShards | None:
        """The [rows, seq_len] token shards of a split, read row by row on demand (every rank sees all
        rows and reads only those training/data.py's sampler gives it); None when the split has none."""
        return TokenShards.open(data_dir, split)

    def latest_checkpoint(self) -> AbstractContextManager[str | None] | None:
        """After a restart, the checkpoint to continue from, as a context giving a local folder."""
        folder = ckpt.latest_complete(self.storage_dir)
        return nullcontext(folder) if folder else None

    @contextmanager
    def checkpoint_folder(self, step: int) -> Iterator[str]:
        """The folder to write step's checkpoint into; report() must be called inside the context."""
        if self.storage_dir is None:  # nowhere to keep it: the report function copies what it wants
            with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as tmp:
                yield os.path.join(tmp, ckpt.step_dir_name(step))
            return
        yield os.path.join(self.storage_dir, ckpt.step_dir_name(step))

    # ---- collectives -------------------------------------------------------------------------------
    def stop_requested(self, step: int, preemption_check_every: int) -> bool:
        """True on every rank when any rank was asked to stop (one tiny all-reduce per step)."""
        return self.any_rank(self.stop.is_set())

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: torch.Tensor) -> float:
        t = value.detach().float().reshape(1).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.item() / self.world

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        dist.barrier()


class Torchrun(Runtime):
    """A process started by `torchrun`: ranks from RANK / WORLD_SIZE / LOCAL_RANK."""

    def __init__(self, storage_dir: str):
        super().__init__(
            storage_dir,
            rank=int(os.environ["RANK"]),
            world=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    def close(self) -> None:
        super().close()
        if dist.is_initialized():
            dist.destroy_process_group()


class InProcess(Runtime):
    """This process alone, rank 0 of 1. DeepSpeed needs a process group even then: a gloo (or NCCL)
    group of one over an in-memory store, so no port is opened and nothing else has to be running.

    The group stays up after the run: DeepSpeed keeps the world group in module globals (deepspeed.comm's
    backend, its cached groups), so a second run in this process (a reused Tune actor, a test) must find
    the same group rather than a new one."""

    # What a launcher would have set: DeepSpeed's engine asserts LOCAL_RANK, and reads the others.
    LAUNCHER_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}

    def __init__(self, storage_dir: str | None = None):
        super().__init__(storage_dir)
        self._added_env: list[str] = []

    def init_process_group(self, use_gpu: bool) -> None:
        self._added_env = [k for k in self.LAUNCHER_ENV if k not in os.environ]
        os.environ.update(self.LAUNCHER_ENV)
        if not dist.is_initialized():
            backend = "nccl" if use_gpu else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        elif dist.get_world_size() != 1:
            raise RuntimeError("InProcess runs alone, but this process is in a group of several ranks")
        super().init_process_group(use_gpu)

    def close(self) -> None:
        super().close()
        for key in self._added_env:
            os.environ.pop(key, None)
        self._added_env = []


class RayTrain(Runtime):
    """A Ray Train worker (TorchTrainer): Ray Train has made the process group and owns restarts."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        super().__init__(None, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
        self._actor = None

    def pick_device(self, use_gpu: bool) -> torch.device:
        if not use_gpu:
            return torch.device("cpu")
        import ray.train.torch

        return ray.train.torch.get_device()  # the GPU Ray assigned to this worker

    def watch_stop(self) -> None:
        self._restore_sigterm = catch_ray_worker_sigterm(self.stop)

    def latest_checkpoint(self) -> AbstractContextManager[str | None] | None:
        import ray.train

        c = ray.train.get_checkpoint()
        return c.as_directory() if c is not None else None

    @contextmanager
    def checkpoint_folder(self, step: int) -> Iterator[str]:
        # Each rank writes locally; ray.train.report (inside this context) uploads and merges them.
        with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as tmp:
            yield os.path.join(tmp, ckpt.step_dir_name(step))

    def stop_requested(self, step: int, preemption_check_every: int) -> bool:
        self._wake_main_thread()
        # ray.train.get_preemption_info is a barrier across workers: every rank asks on the same steps.
        notice = step % preemption_check_every == 0 and self._preemption_notice()
        return self.any_rank(self.stop.is_set() or notice)

    def _preemption_notice(self) -> bool:
        """Ray Train's public notice that a node of this run is draining (e.g. a spot reclaim)."""
        import ray.train

        return ray.train.get_preemption_info() is not None

    def _wake_main_thread(self) -> None:
        """Python runs signal handlers only on the main thread, and a Ray Train worker's main thread runs
        Python only when the actor gets a call (otherwise at Ray's 2 s health checks). A no-op call on
        this worker's own actor each step lets a SIGTERM reach the loop by the next step boundary."""
        if self._actor is False:
            return
        import ray

        try:
            if self._actor is None:
                self._actor = ray.get_runtime_context().current_actor
            self._actor.__ray_ready__.remote()
        except Exception:  # best effort: the 2 s health check still delivers the signal
            self._actor = False


def ray_train_report(every: int) -> Callable[[dict[str, Any], str | None], None]:
    """The report function of a TorchTrainer worker: passes on every checkpoint, and the metrics of every
    `every`-th step. Every rank calls it on the same steps, as it must: ray.train.report is a barrier, and
    it waits until Ray's controller has taken the previous report (its queue holds one), which costs
    about a second per call; the loop itself calls it every step. Ray Train stores the checkpoint under
    the run's storage path by the folder's name (step_XXXXXXXX)."""

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        if checkpoint_dir is None and metrics.get("step", 0) % every:
            return
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = os.path.basename(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    return report


# ---- SIGTERM ---------------------------------------------------------------------------------------


def catch_sigterm(stop: StopRequest):
    """Turn the first SIGTERM into a stop request; a second one does what SIGTERM did before.

    Needs the main thread (signal.signal). Elsewhere: in a Ray worker (a Tune trial runs its function in
    a thread) the Ray hook below; in any other thread SIGTERM is left alone. Returns the undo function."""
    if threading.current_thread() is not threading.main_thread():
        return catch_ray_worker_sigterm(stop) if _in_ray_worker() else None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        if not stop.is_set():
            stop.set("SIGTERM")
            return
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL: terminate as if no handler had been installed
            signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


# The stop request Ray's SIGTERM handler feeds; one per process, set by the runtime that is running.
_ray_sigterm_target: StopRequest | None = None


def catch_ray_worker_sigterm(stop: StopRequest):
    """The same as catch_sigterm for a Ray worker process, where the loop runs off the main thread.

    Ray's worker installs its own SIGTERM handler on the main thread; it calls
    ray._private.worker.raise_sys_exit_with_custom_error_message, which raises SystemExit there and
    ends the actor before the loop can take a checkpoint. That function is wrapped here so that the
    first SIGTERM becomes a stop request instead. This is a private hook, kept because Ray 2.60 has no
    public API that does this: ray.train.get_preemption_info() (ray/train/v2/api/train_fn_utils.py)
    reports node drains seen by Ray Train's PreemptionWatcher (GCS draining nodes), not a SIGTERM sent
    to a worker; ray.train.get_context() / TrainContext has no stop or signal accessor;
    FailureConfig.max_preemption_failures and PreemptionError only decide the restart budget after a
    worker is gone; and Ray Train v2's only signal handling is SIGINT on the driver
    (data_parallel_trainer.py). Remove this once Ray Train offers a graceful-stop request for workers.
    """
    global _ray_sigterm_target
    import ray._private.worker as ray_worker

    _ray_sigterm_target = stop
    original = ray_worker.raise_sys_exit_with_custom_error_message
    if not getattr(original, "_raylm", False):

        def intercept(message: str, exit_code: int = 1):
            target = _ray_sigterm_target
            if "SIGTERM" in message and target is not None and not target.is_set():
                target.set("SIGTERM")
                return
            original(message, exit_code)

        intercept._raylm = True  # type: ignore[attr-defined]
        ray_worker.raise_sys_exit_with_custom_error_message = intercept

    def undo() -> None:
        global _ray_sigterm_target
        if _ray_sigterm_target is stop:
            _ray_sigterm_target = None

    return undo


def _in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # no Ray installed, or no runtime context
        return False

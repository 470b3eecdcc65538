"""engine: torch's checkpoints: torch.distributed.checkpoint (DCP) shards of model and optimizer, every rank's RNG
and the trainer state, written in the background while training goes on and published as one directory, so that a
crash at any instant never damages the last complete checkpoint nor leaves anything that looks complete.

On disk, ``RUN_DIR/checkpoints/step_00001000/`` (``keizoku.rundir``: names, staging, the commit marker, pruning)
holds ``__N_M.distcp`` and ``.metadata`` (DCP: model and optimizer state, resharded on load to any world size),
``rng_rank{R}.pt`` (each rank's CPU and CUDA generator) and ``trainer_state.json`` (``TRAINER_STATE``: step,
consumed samples and tokens, the LR scheduler's state, the run's length in steps), and ``keizoku-commit.json``.
Every rank writes into one staging directory, ``.tmp.step_00001000``; rank 0 commits it (marker, then rename)
once every rank's write has finished, then prunes to the newest ``checkpoint.keep_last``.

A save (``Checkpointer``), step by step:

1. every rank, in the training thread: wait for the save before it to be published (at most one in flight); one
   broadcast from rank 0 on the checkpoints' own gloo group tells every rank whether that save succeeded and that
   rank 0 has made the staging directory and written the trainer state into it;
2. every rank writes its RNG file and copies model and optimizer state to host memory (DCP's ``DefaultStager``:
   pinned buffers kept from one save to the next on a GPU, where the copy may also run on a side stream until the
   optimizer's next step, ``_before_optimizer_step``); then training goes on — what is written is the state at
   this step, RNG and trainer state included, whatever the training does meanwhile;
3. in DCP's background thread, every rank writes its shards. DCP's collectives run on the gloo group, never on the
   training's process group (NCCL forbids two threads on one communicator), and its last one gathers every
   rank's write result to rank 0 before rank 0 writes ``.metadata``: so rank 0's save is done only once every
   rank's is, and rank 0 commits and prunes then, in this module's background thread, with no collective at all.

A kill at any instant leaves the newest committed checkpoint intact and the save in flight under its staging name,
which the next start removes (``rundir.remove_staged``). ``wait`` (every rank, in step: a stop request, the end
of training) returns once the save in flight is published; ``close`` (any way out, no collective) waits for it too:
every rank's write goes on in the background whatever its training thread does, so a save that was started is
published, or it failed and left only staged debris.

With ``checkpoint.background: false``, or where torch's DCP lacks ``async_save`` with a stager (torch < 2.8), a
save writes and publishes before it returns, as keizoku did before (the same files).
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from keizoku import rundir
from keizoku.engines.torch import TrainingError

TRAINER_STATE = "trainer_state.json"
WAIT_WARNING_S = 1.0  # a save that waits longer for the one before it says so
TEST_HOOK_ENV = "KEIZOKU_TEST_CHECKPOINT_HOOK"  # tests only: see _test_hook
# DCP writer threads per rank (files per rank): one thread writes ~0.9 GB/s from host memory on the H200 machine's
# disk, eight 1.9 GB/s (bench/scale/write_speed.py); the node's cores are shared by its ranks
MAX_WRITE_THREADS = 8


@dataclass
class _InFlight:
    step: int
    published: Future  # this rank's part done; on rank 0: committed and pruned


class Checkpointer:
    """Saves checkpoints (see the module docstring). Every rank makes one, at the same point (it creates a
    process group), and calls ``save`` at the same steps, ``wait`` at the same points and ``close`` on the way out."""

    def __init__(self, run_dir: Path, keep_last: int, background: bool = True,
                 on_published: Callable[[int], None] | None = None):
        # on_published(step): rank 0, the publishing thread, once a checkpoint is complete (downstream evaluation)
        self.run_dir, self.keep_last, self.rank = Path(run_dir), keep_last, dist.get_rank()
        self.on_published = on_published
        # DCP's collectives from its background thread: a group of their own, on the CPU
        self.group = dist.new_group(backend="gloo")
        why_not = _no_async_save() if background else None
        self.asynchronous = background and why_not is None
        if why_not and self.rank == 0:
            print(f"keizoku: checkpoints are written before training goes on ({why_not})", flush=True)
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keizoku-checkpoint")
        self._in_flight: _InFlight | None = None
        self._stager = None  # made at the first save, in the training thread, on its device
        self._staging: Future | None = None  # a copy still running on a GPU side stream
        self._hook = None  # the optimizer's step pre-hook that waits for that copy
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.write_threads = max(1, min(MAX_WRITE_THREADS, (os.cpu_count() or 1) // ranks_here))

    # --- the training thread ----------------------------------------------------------------------------------

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
             keep: str | None = None) -> None:
        """Every rank: start saving ``step``; returns once the state is copied (asynchronous) or published. ``keep``:
        why pruning must never remove it (``rundir.commit_checkpoint``)."""
        final = rundir.checkpoint_path(self.run_dir, step)
        staged = rundir.staging_path(final, tag="")  # one name that every rank knows
        previous, start = self._in_flight, time.perf_counter()
        error = self._finish_in_flight()
        waited = time.perf_counter() - start
        if self.rank == 0 and previous is not None and waited > WAIT_WARNING_S:
            print(f"keizoku: the save of step {step} waited {waited:.1f} s for step {previous.step}'s to be written "
                  "(at most one save is in flight); a longer checkpoint.interval lets training run on",
                  flush=True)
        if self.rank == 0 and error is None:
            rundir.discard(staged)  # what a failed save of this step left
            staged.mkdir(parents=True)
            rundir.write_atomic(staged / TRAINER_STATE, json.dumps(trainer_state, indent=1))
        self._raise_if_failed(error)  # also: the staging directory exists before the other ranks write into it
        torch.save(_rng_state(), staged / f"rng_rank{self.rank}.pt")
        _test_hook(step, "staging")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.asynchronous:
            written = self._write_in_background(state, staged, step, optimizer)
        else:  # here: DCP on a GPU's state from another thread would open a CUDA context on GPU 0
            written = _run_now(dcp.save, state, storage_writer=self._writer(staged), process_group=self.group,
                               planner=_planner(step))
        self._in_flight = _InFlight(step, self._publisher.submit(self._publish, step, written, staged, final, keep))
        if not self.asynchronous:
            self.wait()

    def wait(self) -> None:
        """Every rank, in step (before a stop or the end): return once the save in flight, if any, is published.
        Raises ``TrainingError`` on every rank if it failed."""
        self._raise_if_failed(self._finish_in_flight())

    def close(self) -> None:
        """Every rank, on any way out, no collective: a save in flight is waited for (its writes go on in the
        background whatever the training did); then the host buffers and threads are released."""
        if self._in_flight is not None:
            if self.rank == 0:
                print(f"keizoku: waiting for the checkpoint of step {self._in_flight.step} to be written", flush=True)
            error = self._finish_in_flight()
            if error and self.rank == 0:
                print(f"keizoku: {error}", flush=True)
        self._publisher.shutdown(wait=True)
        if self._hook is not None:
            self._hook.remove()
        if self._stager is not None:
            release = getattr(self._stager._state_dict_stager, "release", None)
            if release is not None:
                release()
            self._stager.close()

    def _finish_in_flight(self) -> str | None:
        """Wait for the save in flight (this rank's write; on rank 0 also the commit); what went wrong, if it did."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return None
        try:
            self._await_staging()
            in_flight.published.result()
        except Exception as e:  # reported on every rank by _raise_if_failed
            return f"the checkpoint of step {in_flight.step} failed: {type(e).__name__}: {e}"
        return None

    def _raise_if_failed(self, error: str | None) -> None:
        """One broadcast from rank 0: every rank raises if rank 0's save failed (a failed write fails on every rank:
        DCP gathers the failures), or learns that rank 0's part is done."""
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0, group=self.group)
        error = outcome[0] or error
        if error:
            raise TrainingError(f"{error} (the checkpoints before it are complete)")

    # --- writing ----------------------------------------------------------------------------------------------

    def _write_in_background(self, state: dict, staged: Path, step: int, optimizer) -> Future:
        """Copy ``state`` to host memory and hand it to DCP's background writer; the future of that write."""
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = next(iter(state["model"].values())).device.type == "cuda"
        overlap = cuda and _overlapped_staging()
        if self._stager is None:
            # pinned buffers, kept: the copy runs at the link's speed and no save allocates again
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=overlap, use_non_blocking_copy=cuda))
            _keep_host_copies(self._stager)
        if overlap:
            torch.cuda.current_stream().synchronize()  # the side stream's copy must see this step's update
            if self._hook is None:
                self._hook = optimizer.register_step_pre_hook(lambda *_: self._await_staging())
        response = dcp.async_save(state, storage_writer=self._writer(staged), process_group=self.group,
                                  async_stager=self._stager, planner=_planner(step))
        if isinstance(response, Future):  # staged before async_save returned
            return response
        self._staging = response.staging_completion  # the optimizer's next step waits for it
        return response.upload_completion

    def _writer(self, staged: Path):
        return dcp.FileSystemWriter(str(staged), thread_count=self.write_threads)

    def _await_staging(self) -> None:
        """Before the optimizer changes the weights: the copy of the last save's state must be complete."""
        staging, self._staging = self._staging, None
        if staging is not None:
            staging.result()

    # --- the background thread --------------------------------------------------------------------------------

    def _publish(self, step: int, written: Future, staged: Path, final: Path, keep: str | None) -> Path:
        """Once this rank's DCP save is done (on rank 0: every rank's), rank 0 commits and prunes, then tells
        ``on_published``."""
        written.result()
        _test_hook(step, "commit")
        if self.rank == 0:
            rundir.commit_checkpoint(staged, final, step, keep=keep)
            rundir.prune_checkpoints(self.run_dir, self.keep_last)
            if self.on_published is not None:
                self.on_published(step)
        return final


def _keep_host_copies(stager) -> None:
    """Make ``stager`` (a DefaultStager) keep its host copies from one save to the next. torch 2.11's
    ``DefaultStager._stage`` closes its StateDictStager after every save (pytorch/pytorch#183413): the cached host
    buffers go (each save allocates and pins them again: 17 s at 3.6B parameters on an H200) and with them the
    stager's copy table, so that the second save fails (KeyError: <class 'type'>). Its StateDictStager is replaced
    with one whose ``close`` does nothing; ``Checkpointer.close`` releases it."""
    try:
        from torch.distributed.checkpoint._state_dict_stager import StateDictStager
    except ImportError:
        return
    inner = getattr(stager, "_state_dict_stager", None)
    if not isinstance(inner, StateDictStager):
        return

    class KeptStateDictStager(StateDictStager):
        def close(self) -> None:
            pass  # DefaultStager._stage's, after each save

        def release(self) -> None:
            StateDictStager.close(self)

    stager._state_dict_stager = KeptStateDictStager(pin_memory=inner.pin_memory, share_memory=inner.share_memory)


def _run_now(fn, *args, **kwargs) -> Future:
    """Run ``fn`` here; a done future of its result or exception."""
    done: Future = Future()
    try:
        done.set_result(fn(*args, **kwargs))
    except Exception as e:
        done.set_exception(e)
    return done


def _no_async_save() -> str | None:
    """Why this torch cannot save in the background, or None: keizoku needs ``dcp.async_save`` with a stager whose
    host buffers outlive a save (``DefaultStager``, torch 2.8+)."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no DCP DefaultStager; torch 2.8+ writes them in the background"
    if "async_stager" not in inspect.signature(dcp.async_save).parameters:
        return f"torch {torch.__version__}: dcp.async_save takes no stager; torch 2.8+ writes them in the background"
    return None


def _overlapped_staging() -> bool:
    """Whether async_save can copy on a side stream while the next step computes (it then returns both futures)."""
    try:
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse  # noqa: F401
    except ImportError:
        return False
    return True


def restore(path: Path, model, optimizer) -> dict:
    """Restore model and optimizer; returns the trainer state. The RNG is restored apart (``restore_rng``), right
    before the next step: building the data loader draws from it in between."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_trainer_state(path)


def read_trainer_state(path: Path) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def restore_rng(path: Path) -> None:
    """This rank's RNG as it was when the checkpoint was saved."""
    rng = path / f"rng_rank{dist.get_rank()}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))


def _rng_state() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- tests only ---------------------------------------------------------------------------------------------------

def _test_hook(step: int, phase: str) -> None:
    """``KEIZOKU_TEST_CHECKPOINT_HOOK=STEP:PHASE:ACTION[:RANK]``: at PHASE of the save of STEP (``staging``: the
    staging directory and RNG written, nothing copied; ``writing``: in the middle of DCP's write; ``commit``: every
    rank's write done, nothing committed), on RANK or every rank, kill this process (``kill``: SIGKILL) or pause
    (``sleep=SECONDS``; ``until=PATH``: until PATH exists, at most 5 minutes). Lets tests kill or hold a save at a
    chosen instant without touching DCP."""
    spec = os.environ.get(TEST_HOOK_ENV)
    if not spec:
        return
    at_step, at_phase, action, *rank = spec.split(":")
    if int(at_step) != step or at_phase != phase or rank and int(rank[0]) != dist.get_rank():
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    kind, _, value = action.partition("=")
    if kind == "until":
        deadline = time.monotonic() + 300
        while not os.path.exists(value) and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    time.sleep(float(value))


def _planner(step: int):
    """DCP's default planner, or (tests) one that runs ``_test_hook(step, "writing")`` once this rank's first item
    is written and before the next: DCP resolves each item's data just before writing it."""
    if TEST_HOOK_ENV not in os.environ:
        return None
    from torch.distributed.checkpoint import DefaultSavePlanner

    class MidWriteHook(DefaultSavePlanner):
        resolved = 0

        def resolve_data(self, write_item):
            self.resolved += 1
            if self.resolved == 2:
                _test_hook(step, "writing")
            return super().resolve_data(write_item)

    return MidWriteHook()

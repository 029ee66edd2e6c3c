"""The one owner of saving and loading training state: ``Checkpointer.save(step)`` / ``load(folder)``.

Save (collective; every rank calls it at the same step):
1. never from non-finite weights; wait for the save in flight (if any) and agree on its outcome;
2. stage: every rank takes the fp32 master weights and AdamW state of the pieces it writes
   (checkpoint/layout.py: its experts, a share of the non-expert tensors) into host memory; no
   gather, nothing crosses ranks except DeepSpeed's own per-parameter reads under ZeRO;
3. write (in a background thread with ``trainer.async_checkpoint``): each rank writes its shards
   ``model-0000k-of-0000N.safetensors`` / ``optimizer-...`` and its rank state into the folder
   ``.tmp-step_N``, hashing as it writes, and leaves a marker with its digests (or its error);
4. publish (rank 0, same thread): once every rank's marker is there, the indexes and the manifest
   are assembled from the digests (no re-read), the folder renamed, ``latest`` moved, old ones pruned.
A failure anywhere (OSError, safetensors errors, one rank failing) is one outcome: the partial
folder is removed, ``latest`` stays, all ranks agree at the next join and ``trainer.on_save_error``
decides (checkpoint/save_errors.py). The training thread never runs a collective concurrently with
the writer: the writer only touches files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from moetrain.checkpoint import layout
from moetrain.checkpoint.integrity import MANIFEST, file_digest, fsync_dir
from moetrain.checkpoint.manager import CheckpointManager, fault_point, step_dirname
from moetrain.checkpoint.model_file import CONFIG_FILE, TOKENIZER_DIR
from moetrain.checkpoint.rank_state import write_rank_state
from moetrain.checkpoint.save_errors import SavePolicy
from moetrain.checkpoint.shards import ShardStream, Written, write_index, write_shard
from moetrain.distributed import all_gather_object, any_rank, broadcast_object

STATE_FILE = "trainer_state.json"
MODEL_INDEX = "model.safetensors.index.json"
OPTIMIZER_INDEX = "optimizer.safetensors.index.json"
FORMAT = "moetrain-sharded-1"
_MARKER = ".rank_{:05d}.{}"  # done | failed
MARKER_TIMEOUT_S = 3600.0


def shard_name(kind: str, k: int, n: int) -> str:
    return f"{kind}-{k + 1:05d}-of-{n:05d}.safetensors"


class Checkpointer:
    def __init__(
        self,
        *,
        root: Path,
        rank: int,
        world_size: int,
        ep_size: int,
        keep_last: int,
        policy: SavePolicy,
        async_save: bool,
        log: Callable[[str], None],
    ) -> None:
        self.manager = CheckpointManager(root, rank, keep_last)
        self.root, self.rank, self.world, self.ep_size = root, rank, world_size, ep_size
        self.policy, self.async_save, self.log = policy, async_save, log
        self._thread: threading.Thread | None = None
        self._pending: dict[str, Any] | None = None  # the save in flight: step, result
        self.last_saved: Path | None = None
        self.stats: list[dict[str, float]] = []  # per save: blocking and total seconds

    # ---- saving ------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module,
        view: Any,
        weights_finite: bool,
        trainer_state: dict[str, Any],
        loader_state: dict[str, Any],
        config: dict[str, Any],
        tokenizer: Any,
        final: bool = False,
    ) -> Path | None:
        """Collective. Returns the published folder (synchronous, or ``final``), else None (the
        write goes on in the background; ``wait`` returns its folder)."""
        if any_rank(not weights_finite):
            self.log(f"error: step {step}: weights are not finite; checkpoint NOT written (older ones kept)")
            return None
        self.wait()
        t0 = time.perf_counter()
        io0 = io_counters()
        tmp = self.root / f".tmp-{step_dirname(step)}"
        problem = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(".tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                problem = f"rank 0: {e}"
        problem = broadcast_object(problem)
        if problem is None:
            model_part, optim_part = self._stage(model, view, copy=self.async_save and not final, tmp=tmp)
        blocked = time.perf_counter() - t0
        self._pending = {
            "step": step,
            "tmp": tmp,
            "t0": t0,
            "blocked": blocked,
            "problem": problem,
            "final": final,
            "io0": io0,
        }
        if problem is None:
            job = (self._pending, model_part, optim_part, trainer_state, loader_state, config, tokenizer)
            if self.async_save and not final:
                self._thread = threading.Thread(target=self._write, args=job, daemon=True, name="checkpoint")
                self._thread.start()
                return None
            self._write(*job)
        return self.wait()

    def _stage(self, model: torch.nn.Module, view: Any, *, copy: bool, tmp: Path):
        """This rank's pieces: fp32 values of the model and of each optimizer state key, in host
        memory. ``view.master`` / ``view.state`` are collective under ZeRO (every rank calls them for
        every parameter, in order); only the writer keeps a piece.

        A synchronous save of gathered values (ZeRO; ``view.gathers``) writes each piece to its
        file as it is gathered (``ShardStream``) instead: the share of masters and AdamW moments
        is never staged whole (the peak of a ZeRO-3 save). The parts returned are then the streams."""
        all_pieces = layout.pieces(model, self.world, self.ep_size)
        writer = layout.writers(all_pieces, self.world)
        here = layout.held_here(all_pieces, self.rank, model)
        keys = view.state_keys()
        step_count = view.step_count()
        plan = [
            (name, t, is_param, [p for p in here.get(name, []) if writer[p.name] == self.rank])
            for name, t, is_param in layout.stored_tensors(model)
        ]
        parts: dict[str, Any] = {"model": [], "optimizer": []}
        stream = not copy and view.gathers
        if stream:
            parts = {
                kind: ShardStream(tmp / shard_name(kind, self.rank, self.world), entries, {"format": "pt"})
                for kind, entries in self._entries(plan, keys, torch.tensor(step_count)).items()
            }

        # An expert's piece is a view of its whole tensor; of a gathered one (ZeRO) it is copied, so
        # each gathered tensor is freed after its turn: otherwise every rank keeps the whole model's
        # masters and AdamW moments alive until written (measured: ZeRO-3's peak above ZeRO-0's).
        # A whole gathered tensor is already this rank's own fresh copy: kept as it is, not copied a
        # second time. A live tensor (ZeRO-0) is copied for a background write only.
        def keep(kind: str, name: str, t: torch.Tensor, fresh: bool = False) -> None:
            t = t.detach()
            if stream:
                parts[kind].write(name, t)
            else:
                own = (copy or view.gathers) and not fresh
                parts[kind].append((name, t.to("cpu", copy=True) if own or t.device.type != "cpu" else t))

        for _, t, is_param, mine in plan:
            value = view.master(t) if is_param else t
            for p in mine:
                keep(
                    "model",
                    p.name,
                    layout.piece_of(value, p),
                    fresh=is_param and view.gathers and p.local is None,
                )
            if not is_param:
                continue
            for key in keys:
                state = view.state(t, key)
                for p in mine:
                    keep(
                        "optimizer",
                        f"{key}/{p.name}",
                        layout.piece_of(state, p),
                        fresh=view.gathers and p.local is None,
                    )
            if keys:
                for p in mine:
                    keep("optimizer", f"step/{p.name}", torch.tensor(step_count))
        return parts["model"], parts["optimizer"]

    @staticmethod
    def _entries(plan: list[Any], keys: list[str], step: torch.Tensor) -> dict[str, list[Any]]:
        """(name, dtype, shape) of every piece ``_stage`` keeps, in its order: parameters and their
        optimizer state in fp32, buffers as they are, the step counters as ``step``."""
        out: dict[str, list[Any]] = {"model": [], "optimizer": []}
        for _, t, is_param, mine in plan:
            shape = tuple(getattr(t, "ds_shape", t.shape))  # ZeRO-3: data is empty outside the forward
            shapes = [shape if p.local is None else shape[1:] for p in mine]
            out["model"] += [
                (p.name, torch.float32 if is_param else t.dtype, s) for p, s in zip(mine, shapes, strict=True)
            ]
            if is_param:
                for key in keys:
                    out["optimizer"] += [
                        (f"{key}/{p.name}", torch.float32, s) for p, s in zip(mine, shapes, strict=True)
                    ]
                if keys:
                    out["optimizer"] += [(f"step/{p.name}", step.dtype, ()) for p in mine]
        return out

    def _write(self, pending, model_part, optim_part, trainer_state, loader_state, config, tokenizer) -> None:
        """Files only (no collectives): runs in the background thread or inline."""
        tmp, step = pending["tmp"], pending["step"]
        marker = tmp / _MARKER.format(self.rank, "done")
        try:
            files: dict[str, dict[str, Any]] = {}
            shards: dict[str, Written] = {}
            for kind, part in (("model", model_part), ("optimizer", optim_part)):
                if isinstance(part, ShardStream):  # written while staged: only its end is left
                    w = part.close()
                else:
                    w = write_shard(tmp / shard_name(kind, self.rank, self.world), part, {"format": "pt"})
                shards[kind] = w
                files[w.file] = {"bytes": w.bytes, "sha256": w.sha256}
            del model_part, optim_part
            rs = write_rank_state(tmp, self.rank, loader_state)
            fault_point("files", step)
            small = [rs]
            if self.rank == 0:
                with open(tmp / CONFIG_FILE, "w") as f:
                    yaml.safe_dump(config, f, sort_keys=False)
                (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
                small += [tmp / CONFIG_FILE, tmp / STATE_FILE]
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
                    small += [p for p in (tmp / TOKENIZER_DIR).rglob("*") if p.is_file()]
            for p in small:  # a few KB each
                files[str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, "sha256": file_digest(p)}
            body = {"files": files, "names": {k: w.names for k, w in shards.items()}}
            tmp_marker = marker.with_suffix(".part")
            tmp_marker.write_text(json.dumps(body))
            tmp_marker.rename(marker)
        except Exception as e:  # OSError, SafetensorError, anything: one outcome, reported once
            with contextlib.suppress(OSError):
                (tmp / _MARKER.format(self.rank, "failed")).write_text(f"rank {self.rank}: {_cause(e)}")
            pending["problem"] = f"rank {self.rank}: {_cause(e)}"
        if self.rank == 0:
            self._publish(pending)

    def _publish(self, pending: dict[str, Any]) -> None:
        """Rank 0: wait for every rank's marker, then index + manifest + rename + latest + prune."""
        tmp, step = pending["tmp"], pending["step"]
        deadline = time.time() + MARKER_TIMEOUT_S
        bodies: dict[int, dict[str, Any]] = {}
        while pending["problem"] is None and len(bodies) < self.world and not pending.get("abort"):
            for r in range(self.world):
                if r in bodies:
                    continue
                failed = tmp / _MARKER.format(r, "failed")
                done = tmp / _MARKER.format(r, "done")
                if failed.is_file():
                    pending["problem"] = failed.read_text().strip() or f"rank {r} failed"
                    break
                if done.is_file():
                    bodies[r] = json.loads(done.read_text())
            else:
                if len(bodies) < self.world:
                    if time.time() > deadline:
                        pending["problem"] = (
                            f"ranks {sorted(set(range(self.world)) - set(bodies))} never finished"
                        )
                    time.sleep(0.02)
        if pending.get("abort"):
            pending["problem"] = pending["abort"]
        try:
            if pending["problem"] is None:
                pending["path"] = self._assemble(tmp, step, bodies)
        except Exception as e:
            pending["problem"] = f"rank 0: {_cause(e)}"
        if pending["problem"] is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def _assemble(self, tmp: Path, step: int, bodies: dict[int, dict[str, Any]]) -> Path:
        files: dict[str, Any] = {}
        for r in range(self.world):
            files.update(bodies[r]["files"])
            (tmp / _MARKER.format(r, "done")).unlink()
        for kind, index in (("model", MODEL_INDEX), ("optimizer", OPTIMIZER_INDEX)):
            weight_map = {
                name: shard_name(kind, r, self.world)
                for r in range(self.world)
                for name in bodies[r]["names"][kind]
            }
            total = sum(files[shard_name(kind, r, self.world)]["bytes"] for r in range(self.world))
            write_index(tmp / index, weight_map, total, {"format": FORMAT, "producer": "moetrain"})
            files[index] = {"bytes": (tmp / index).stat().st_size, "sha256": file_digest(tmp / index)}
        manifest = tmp / f".{MANIFEST}.tmp"
        with open(manifest, "w") as f:
            json.dump({"version": 1, "files": dict(sorted(files.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        manifest.rename(tmp / MANIFEST)
        fsync_dir(tmp)
        return self.manager.publish(tmp, step)

    def wait(self) -> Path | None:
        """Collective: finish the save in flight and agree on its outcome (the failure policy may
        raise ``SaveFailure`` on every rank). Returns the published folder or None."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if self._thread is not None and self.rank != 0:
            self._thread.join()
        # Every rank's own outcome first (a rank that could not even write its marker is heard here),
        # while rank 0's writer may still be publishing; then rank 0's verdict for all.
        others = all_gather_object(pending.get("problem") if self.rank != 0 else None)
        failed = next((p for p in others if p), None)
        if failed and self.rank == 0:
            pending["abort"] = failed
        if self._thread is not None:
            self._thread.join()
        self._thread = None
        outcome = (str(pending["path"]) if pending.get("path") else None, pending.get("problem"))
        path, problem = broadcast_object(outcome)
        if problem is None:  # rank 0 published; another rank's own error reached rank 0 by its marker
            self._record(pending)
            self.policy.succeeded()
            self.last_saved = Path(path)
            self.log(f"checkpoint saved: {path}")
            return self.last_saved
        if self.rank == 0:
            self.manager.discard_partial()
        self.policy.failed(
            pending["step"], problem, self.root, self.manager.latest(), self.log, final=pending["final"]
        )
        return None

    def _record(self, pending: dict[str, Any]) -> None:
        """Per save: seconds the step was blocked, seconds until published, bytes this process
        wrote and read meanwhile, its memory (``MOETRAIN_CHECKPOINT_STATS=1`` appends them to
        ``checkpoint_stats_rank_N.jsonl`` in the run dir: benchmarks/checkpoint_io.py)."""
        io1 = io_counters()
        rec = {
            "step": pending["step"],
            "async": self.async_save and not pending["final"],
            "blocked_s": pending["blocked"],
            "total_s": time.perf_counter() - pending["t0"],
            **{
                k: io1[k] - pending["io0"][k]
                for k in ("rchar", "wchar", "read_bytes", "write_bytes")
                if k in io1
            },
            **memory_kib(),
        }
        self.stats.append(rec)
        if os.environ.get("MOETRAIN_CHECKPOINT_STATS"):
            with open(self.root.parent / f"checkpoint_stats_rank_{self.rank}.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ---- resuming ------------------------------------------------------------------------------------
    def close(self) -> None:
        """End of run: nothing may be left in flight (collective)."""
        self.wait()


def io_counters() -> dict[str, int]:
    """This process's /proc/self/io (all threads): bytes through read()/write() and to storage."""
    try:
        with open("/proc/self/io") as f:
            return {k.strip(): int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


def memory_kib() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


def _cause(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")

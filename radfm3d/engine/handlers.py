# Copyright (c) radfm3d contributors. Apache-2.0.
"""Ignite/MONAI handlers: atomic training checkpoints with exact resume, prediction JSONL writer, evaluation report
through the harness, and a progress bar with the running loss.

Checkpoint content is ``torch.load(weights_only=True)``-safe: tensors, numbers, strings, lists, tuples and dicts only.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from radfm3d.engine.data import ResumableSampler, dist_info
from radfm3d.engine.training import save_trained_model, unwrap_model
from radfm3d.data.manifest import iter_jsonl
from radfm3d.errors import RadFM3DInputError

__all__ = [
    "TrainingCheckpointer",
    "TimeLimit",
    "PredictionWriter",
    "EvaluationReportHandler",
    "ProgressBar",
    "loss_of",
    "every_n",
    "rng_state",
    "set_rng_state",
    "atomic_torch_save",
    "latest_checkpoint",
    "list_checkpoints",
    "read_training_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "radfm3d-train-checkpoint/1"
_CKPT_RE = re.compile(r"^checkpoint_(\d{8})\.pt$")
_TMP_RE = re.compile(r"^\.checkpoint_\d{8}\.pt\.tmp-(\d+)$")
_REQUIRED_KEYS = {"iteration": int, "epoch": int, "model": Mapping, "optimizer": Mapping, "rng": Mapping}


def loss_of(output: Any) -> float:
    """The scalar loss of a trainer output (``output_transform`` for StatsHandler/TensorBoard/ProgressBar)."""
    if isinstance(output, Mapping):
        output = output["loss"]
    elif isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
        output = output[0]["loss"]
    return float(output.item() if hasattr(output, "item") else output)


def every_n(n: int) -> Callable[[Engine, int], bool]:
    """Ignite event filter: true every ``n`` events (e.g. ``StatsHandler(iteration_log=every_n(10))``)."""
    n = max(1, int(n))

    def _filter(engine: Engine, event: int) -> bool:
        return event % n == 0

    return _filter


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) RNG states as weights_only-safe values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"algo": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["algo"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ files
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace`` (never a half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def list_checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint_<iteration>.pt`` files of ``save_dir``, newest (highest iteration) first."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name)))
    return [p for _, p in reversed(found)]


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest iteration in ``save_dir`` (None if there is none; not checked readable)."""
    found = list_checkpoints(save_dir)
    return found[0] if found else None


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one training checkpoint with ``torch.load(weights_only=True)`` and check its structure.

    Raises ``RadFM3DInputError`` naming the file when it is unreadable (truncated, empty, not a torch zip, a pickle
    with Python objects beyond tensors and containers), not a radfm3d training checkpoint, or missing a part
    (iteration, epoch, model, optimizer, RNG states), or when a saved weight is not finite.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RadFM3DInputError(path, f"corrupt training checkpoint (refused by weights_only loading: {first})"
                                ) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, AttributeError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RadFM3DInputError(path, f"corrupt training checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise RadFM3DInputError(path, f"not a radfm3d training checkpoint (format {found!r})")
    for key, kind in _REQUIRED_KEYS.items():
        if not isinstance(ckpt.get(key), kind):
            raise RadFM3DInputError(path, f"corrupt training checkpoint: {key!r} is missing or not a {kind.__name__}")
    for name, tensor in ckpt["model"].items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RadFM3DInputError(path, f"training checkpoint holds non-finite values in {name!r}")
    return dict(ckpt)


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete ``.checkpoint_*.pt.tmp-<pid>`` files of writers that no longer run (a kill during ``torch.save``)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = _TMP_RE.match(p.name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except (PermissionError, OverflowError):
            pass


def _is_rank0() -> bool:
    return dist_info()[0] == 0


# ------------------------------------------------------------------------------------------ checkpoints
class TrainingCheckpointer:
    """Save the training state atomically and resume from it; export the trained model at the end.

    Saved (``save_dir/checkpoint_<iteration>.pt``, rank 0 only): iteration, epoch, epoch_length, the model's
    trainable parameters (all parameters when ``save_frozen`` or the LLM is not a named base), optimizer,
    LR scheduler, python/numpy/torch RNG states and the sampler's seed/epoch. On ``STARTED`` the latest checkpoint is
    loaded (``resume=True``) and the sampler skips the batches of the current epoch already seen, so the run goes on
    with the same data order. A larger ``max_epochs`` than the saved run extends it.

    Args:
        save_dir: folder of the checkpoints.
        network, optimizer, lr_scheduler: what to save/restore (``network`` may be DDP-wrapped).
        save_interval: save every N iterations (0: only at epoch ends). Keep it a multiple of the trainer's
            ``accumulation_steps`` (a checkpoint between two optimizer steps would lose the accumulated gradient).
        save_every_epoch: also save at each epoch end.
        keep_last: number of checkpoints kept (older ones are deleted after a successful save).
        resume: load the latest checkpoint on ``STARTED``.
        save_frozen: "auto" (frozen weights too when the model has no named base LLM), True or False.
        export_dir: when set, ``save_trained_model(network, export_dir, processor)`` runs on ``COMPLETED``.
        processor: saved beside the exported model.
    """

    def __init__(
        self, save_dir: str | os.PathLike, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None, save_interval: int = 0, save_every_epoch: bool = True, keep_last: int = 2,
        resume: bool = True, save_frozen: bool | str = "auto", export_dir: str | os.PathLike | None = None,
        processor: Any = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.save_interval = int(save_interval)
        self.save_every_epoch = bool(save_every_epoch)
        self.keep_last = max(1, int(keep_last))
        self.resume = bool(resume)
        self.save_frozen = save_frozen
        self.export_dir = Path(export_dir) if export_dir else None
        self.processor = processor
        self._last_saved = -1
        self.resumed_from: Path | None = None
        self.skipped: list[tuple[Path, str]] = []

    def attach(self, engine: Engine) -> None:
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.save_interval > 0:
            acc = int(getattr(engine, "accumulation_steps", 1) or 1)
            if self.save_interval % acc:
                logger.warning(f"save_interval {self.save_interval} is not a multiple of accumulation_steps {acc}: "
                               "a resumed run may differ")
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self.save)
        if self.save_every_epoch:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.TERMINATE, self.save)  # a stopped run (TimeLimit, ...) resumes from here
        if self.export_dir is not None:
            engine.add_event_handler(Events.COMPLETED, self.export)

    # -- what goes in
    def _full_state(self) -> bool:
        if self.save_frozen == "auto":
            config = getattr(unwrap_model(self.network), "config", None)
            return getattr(config, "text_model_name_or_path", None) is None
        return bool(self.save_frozen)

    def model_state(self) -> dict[str, torch.Tensor]:
        inner = unwrap_model(self.network)
        if self._full_state():
            return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}
        state = {n: p.detach().cpu().clone() for n, p in inner.named_parameters() if p.requires_grad}
        # and the saved buffers of every module that trains (batch-norm running statistics): without them a resumed
        # run would continue with fresh statistics
        trained = {name for name, module in inner.named_modules()
                   if any(p.requires_grad for p in module.parameters(recurse=False))}
        buffers = {name for name, _ in inner.named_buffers()}
        for name, tensor in inner.state_dict().items():
            if name in buffers and (name.rpartition(".")[0] in trained):
                state[name] = tensor.detach().cpu().clone()
        return state

    def progress_state(self, engine: Engine) -> dict[str, Any]:
        """The training state besides model and optimizer: engine counters, LR scheduler, RNG states (of this
        process) and the sampler's seed/epoch."""
        loader = getattr(engine, "data_loader", None)
        sampler = getattr(loader, "sampler", None)
        return {
            "format": CHECKPOINT_FORMAT,
            "iteration": int(engine.state.iteration),
            "epoch": int(engine.state.epoch),
            "epoch_length": int(engine.state.epoch_length or 0),
            "max_epochs": int(engine.state.max_epochs or 0),
            "batch_size": int(getattr(loader, "batch_size", 0) or 0),
            "world_size": dist_info()[1],
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else {},
            "rng": rng_state(),
            "sampler": sampler.state_dict() if isinstance(sampler, ResumableSampler) else {},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def state_dict(self, engine: Engine) -> dict[str, Any]:
        return {**self.progress_state(engine), "model": self.model_state(), "optimizer": self.optimizer.state_dict()}

    # -- events
    def save(self, engine: Engine) -> Path | None:
        """Write ``checkpoint_<iteration>.pt`` atomically (rank 0) and prune older ones."""
        iteration = int(engine.state.iteration)
        if iteration == self._last_saved:
            return None
        self._last_saved = iteration
        state = self.state_dict(engine)
        if not _is_rank0():
            return None
        path = atomic_torch_save(state, self.save_dir / f"checkpoint_{iteration:08d}.pt")
        old = sorted(p for p in self.save_dir.iterdir() if _CKPT_RE.match(p.name))[: -self.keep_last]
        for p in old:
            p.unlink(missing_ok=True)
        logger.info(f"checkpoint saved: {path} (iteration {iteration}, epoch {engine.state.epoch})")
        return path

    def _newest_valid(self) -> tuple[Path | None, dict[str, Any]]:
        """The newest checkpoint that :func:`read_training_checkpoint` accepts. Each unreadable newer one is named in
        a warning, kept in ``self.skipped`` and renamed ``*.corrupt`` (rank 0), so it is neither loaded nor pruned
        in its place again; with checkpoints present but none readable, ``RadFM3DInputError`` names them all."""
        if _is_rank0():
            _remove_stale_temporaries(self.save_dir)
        candidates = list_checkpoints(self.save_dir)
        self.skipped = []
        for path in candidates:
            try:
                ckpt = read_training_checkpoint(path)
            except RadFM3DInputError as err:
                self.skipped.append((path, err.problem))
                logger.warning(f"skipping {err}; falling back to the previous checkpoint")
                continue
            if _is_rank0():  # set aside only once a valid one is found: with none, every rerun names them again
                for bad, _ in self.skipped:
                    try:
                        os.replace(bad, bad.with_name(bad.name + ".corrupt"))
                    except OSError:
                        pass
            return path, ckpt
        if candidates:
            raise RadFM3DInputError(self.save_dir, "no readable training checkpoint: " + "; ".join(
                f"{p.name}: {why}" for p, why in self.skipped) + " (delete the folder or pass resume=false to "
                "start over)")
        return None, {}

    def load(self, engine: Engine) -> Path | None:
        """Restore the newest valid checkpoint (if any) into the model, optimizer, scheduler, RNGs and engine state.

        A corrupt newer checkpoint (truncated, empty, garbage, missing parts) is named in a warning and skipped:
        the run resumes from the newest one that reads (see :meth:`_newest_valid`)."""
        path, ckpt = self._newest_valid()
        if path is None:
            return None
        inner = unwrap_model(self.network)
        missing, unexpected = inner.load_state_dict(ckpt["model"], strict=False)
        trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
        lost = sorted(trainable & set(missing))
        if unexpected or lost:
            raise RadFM3DInputError(path, f"checkpoint does not fit the model (unexpected {unexpected[:5]}, "
                                    f"missing trainable {lost[:5]}); was the stage or preset changed?")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.restore_progress(engine, ckpt, path)
        return path

    def restore_progress(self, engine: Engine, ckpt: Mapping[str, Any], path: Path) -> None:
        """Restore what :meth:`progress_state` saved: LR scheduler, engine counters, the sampler's position in the
        current epoch and the RNG states."""
        if self.lr_scheduler is not None and ckpt.get("lr_scheduler"):
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        max_epochs = engine.state.max_epochs
        if max_epochs is not None and ckpt["epoch"] > max_epochs:
            raise RadFM3DInputError(path, f"checkpoint is at epoch {ckpt['epoch']} > max_epochs {max_epochs}; "
                                    "raise max_epochs to extend the run")
        engine.state.iteration = int(ckpt["iteration"])
        engine.state.epoch = int(ckpt["epoch"])
        epoch_length = engine.state.epoch_length
        in_epoch = ckpt["iteration"] % epoch_length if epoch_length else 0
        if epoch_length and ckpt.get("epoch_length") and ckpt["epoch_length"] != epoch_length:
            logger.warning(f"{path}: epoch length changed ({ckpt['epoch_length']} -> {epoch_length}); resuming at "
                           "the start of the next epoch")
            engine.state.iteration = engine.state.epoch * epoch_length
            in_epoch = 0
        elif in_epoch:
            # the engine counts this epoch from `in_epoch`; the sampler must skip the batches already seen
            engine.state.epoch = int(ckpt["iteration"]) // epoch_length
            loader = getattr(engine, "data_loader", None)
            sampler = getattr(loader, "sampler", None)
            if isinstance(sampler, ResumableSampler):
                sampler.skip_next(in_epoch * int(loader.batch_size or 1))
            else:
                logger.warning("the data loader has no ResumableSampler: the resumed epoch restarts its data order")
        set_rng_state(ckpt["rng"])
        self._last_saved = int(ckpt["iteration"])
        self.resumed_from = path
        logger.info(f"resumed from {path}: iteration {engine.state.iteration}, epoch {engine.state.epoch}"
                    + (f" (+{in_epoch} iterations into the next epoch)" if in_epoch else ""))

    def export(self, engine: Engine | None = None) -> Path | None:
        """Save the trained model for inference (rank 0)."""
        if self.export_dir is None or not _is_rank0():
            return None
        path = save_trained_model(self.network, self.export_dir, self.processor)
        logger.info(f"trained model exported to {path}")
        return path


# ------------------------------------------------------------------------------------------- predictions
class TimeLimit:
    """Stop training cleanly after ``max_minutes`` of wall time (counted from ``STARTED``, so loading data and a
    resume are not charged): the trainer terminates at the next iteration end, ``TrainingCheckpointer`` saves the
    state (a rerun with ``resume`` continues from there) and exports the model as at a normal end.

    The learning-rate schedule is not shortened: size ``max_epochs`` to the time you have and keep this as the
    guard that the run ends with a usable model.
    """

    def __init__(self, max_minutes: float) -> None:
        if float(max_minutes) <= 0:
            raise ValueError(f"max_minutes must be > 0, got {max_minutes}")
        self.max_seconds = float(max_minutes) * 60.0
        self._start: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _started(self, engine: Engine) -> None:
        self._start = time.monotonic()

    def _check(self, engine: Engine) -> None:
        if self._start is None:
            return
        over = time.monotonic() - self._start >= self.max_seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must stop at the same iteration, or the others hang in the next all-reduce
            device = torch.device("cuda", torch.cuda.current_device()) \
                if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            flag = torch.tensor([1.0 if over else 0.0], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            over = bool(flag.item() > 0)
        if over:
            logger.warning(f"time limit of {self.max_seconds / 60:.1f} min reached at iteration "
                           f"{engine.state.iteration} (epoch {engine.state.epoch}): stopping, saving and exporting")
            engine.terminate()


class PredictionWriter:
    """Write one JSON line per sample: ``{"id", "prediction", "task", "grid_geometry"}`` (harness format).

    Reads ``engine.state.batch["id"]`` and ``engine.state.output["pred"]`` (list of texts, non-decollated engine).
    Lines go to a hidden ``.<name>.partial`` sibling as they are made (flushed per batch) and the finished file is
    moved onto ``output_file`` with ``os.replace`` on ``COMPLETED``, so ``output_file`` is never half written.
    Under torch.distributed each rank writes a part; rank 0 merges them (atomically) into ``output_file``.
    """

    def __init__(self, output_file: str | os.PathLike, id_key: str = "id", pred_key: str = "pred",
                 meta_keys: Sequence[str] = ("task", "grid_geometry")) -> None:
        self.output_file = Path(output_file)
        self.id_key, self.pred_key, self.meta_keys = id_key, pred_key, tuple(meta_keys)
        self._fh: Any = None
        self._part: Path | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def open(self, engine: Engine | None = None) -> None:
        rank, world = dist_info()
        self._part = self.output_file.with_name(
            f".{self.output_file.name}.partial" if world == 1 else f"{self.output_file.name}.rank{rank}")
        self._part.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self._part.open("w", encoding="utf-8")

    def write(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, Sequence) and not isinstance(output, (str, Mapping)):  # decollated engine output
            preds = [o[self.pred_key] for o in output]
        else:
            preds = output[self.pred_key]
        ids = batch[self.id_key]
        if isinstance(preds, torch.Tensor):
            preds = preds.tolist()
        for i, (sid, pred) in enumerate(zip(ids, preds)):
            row = {"id": str(sid), "prediction": pred}
            for key in self.meta_keys:
                if key in batch and batch[key] is not None and batch[key][i] is not None:
                    row[key] = batch[key][i]
            self._fh.write(json.dumps(row, default=_json_default) + "\n")
        self._fh.flush()

    def close(self, engine: Engine | None = None) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        rank, world = dist_info()
        if world == 1:
            if self._part is not None and self._part.exists():
                os.replace(self._part, self.output_file)
            return
        if world > 1:
            torch.distributed.barrier()
            if rank == 0:
                seen: set[str] = set()
                merged = self.output_file.with_name(f".{self.output_file.name}.partial")
                with merged.open("w", encoding="utf-8") as out:
                    for r in range(world):
                        part = self.output_file.with_name(f"{self.output_file.name}.rank{r}")
                        for _, row in iter_jsonl(part):
                            sid = row.get("id")
                            if sid not in seen:  # DistributedSampler pads with repeats
                                seen.add(sid)
                                out.write(json.dumps(row) + "\n")
                        part.unlink()
                os.replace(merged, self.output_file)
            torch.distributed.barrier()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class EvaluationReportHandler:
    """Score the predictions JSONL (and the blind baseline's) with the harness and write the report.

    Records without a prediction (e.g. a ``limit``-ed run) are left out. Writes ``results.json``, ``report.md`` and
    figures into ``output_dir`` (rank 0). Attach it to the last evaluator, or call :meth:`run` from the config.
    """

    def __init__(self, manifest: str | os.PathLike, predictions_file: str | os.PathLike,
                 output_dir: str | os.PathLike, blind_predictions_file: str | os.PathLike | None = None,
                 embeddings: bool = False, n_resamples: int = 1000, name: str = "radfm3d") -> None:
        self.manifest = Path(manifest)
        self.predictions_file = Path(predictions_file)
        self.blind_predictions_file = Path(blind_predictions_file) if blind_predictions_file else None
        self.output_dir = Path(output_dir)
        self.embeddings, self.n_resamples, self.name = bool(embeddings), int(n_resamples), name
        self.results: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self.run)

    def run(self, engine: Engine | None = None) -> dict[str, Any] | None:
        if not _is_rank0():
            return None
        from radfm3d.evaluation.harness import evaluate_predictions, read_predictions, read_records
        from radfm3d.evaluation.report import write_report

        preds = read_predictions(self.predictions_file)
        blind = None
        if self.blind_predictions_file is not None and self.blind_predictions_file.is_file():
            blind = read_predictions(self.blind_predictions_file)
        records = [r for r in read_records(self.manifest) if str(r["id"]) in preds]
        self.results = evaluate_predictions(records, preds, blind, embeddings=self.embeddings,
                                            n_resamples=self.n_resamples, name=self.name)
        paths = write_report(self.results, self.output_dir, records=records, predictions=preds)
        for line in self.results.get("summary", []):
            logger.info(line)
        logger.info(f"evaluation report: {paths.get('markdown')}")
        return self.results


class ProgressBar:
    """tqdm progress bar per iteration with the running loss (ignite ``ProgressBar``); rank 0 only."""

    def __init__(self, output_transform: Callable[[Any], Any] | None = None, persist: bool = True) -> None:
        self.output_transform = output_transform or (lambda out: {"loss": loss_of(out)})
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        if not _is_rank0():
            return
        from ignite.handlers import ProgressBar as _IgniteBar

        _IgniteBar(persist=self.persist).attach(engine, output_transform=self.output_transform)

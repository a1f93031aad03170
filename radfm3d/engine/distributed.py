# Copyright (c) radfm3d contributors. Apache-2.0.
"""Sharded training with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) under ``torchrun``.

- :func:`shard_model`: each LLM decoder layer (the classes the LLM names in ``_no_split_modules``, LoRA adapters
  inside them) is one FSDP unit; the root unit holds the rest (vision encoder, resampler, projector, token
  embeddings, final norm, LM head). Parameters are sharded along dim 0 over all ranks; frozen and trainable
  parameters may share a unit (FSDP2 shards each parameter on its own, as a ``DTensor``, so there is no flat
  parameter that would need one ``requires_grad``). Optional bf16 mixed precision (``MixedPrecisionPolicy``):
  compute in bf16, gradients reduced and kept in float32, the model output (logits) in float32.
- :class:`ShardedCheckpointer`: :class:`~radfm3d.engine.handlers.TrainingCheckpointer` with sharded checkpoints
  written by ``torch.distributed.checkpoint`` (DCP; each rank writes its own shards, no rank gathers the model),
  committed atomically by renaming the finished folder, and exact resume; the export gathers the full state on
  rank 0 (CPU) and writes it with ``save_pretrained``.
- :func:`gather_full_state`, :func:`parameter_counts`: the full state dict on rank 0; local vs global parameter
  elements of this rank.

FSDP2 is used rather than ``FullyShardedDataParallel`` (FSDP1): PyTorch documents FSDP2 as the maintained API
(its FSDP tutorial: "FSDP1 is deprecated"), it handles mixed ``requires_grad`` without ``use_orig_params`` and
keeps the module's parameter names (its state dicts need no ``state_dict_type`` context), and it runs on the CPU
with gloo.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import pickle
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine
from torch import nn

from radfm3d.engine.data import dist_info
from radfm3d.engine.handlers import CHECKPOINT_FORMAT, TrainingCheckpointer, atomic_torch_save
from radfm3d.engine.training import autocast_dtype, save_trained_model, unwrap_model
from radfm3d.errors import RadFM3DInputError

__all__ = [
    "shard_model",
    "is_sharded",
    "decoder_layers",
    "parameter_counts",
    "gather_full_state",
    "unsharded_copy",
    "export_sharded_model",
    "ShardedCheckpointer",
    "list_sharded_checkpoints",
]

logger = logging.getLogger(__name__)

_DIR_RE = re.compile(r"^checkpoint_(\d{8})$")
_PARTIAL_RE = re.compile(r"^\.checkpoint_\d{8}\.partial$")
_RANK_FILE = "trainer_rank{rank}.pt"
_SKELETON = "_radfm3d_unsharded_skeleton"


def _require_process_group(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what} needs torch.distributed initialised: run under torchrun (e.g. with the bundle's "
                           "multi_gpu_fsdp.json, whose `initialize` calls init_process_group)")


def is_sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to the model (its root)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def decoder_layers(model: nn.Module, class_names: Iterable[str] | None = None) -> list[nn.Module]:
    """The LLM's decoder layers: modules whose class name is in ``class_names`` (default: the LLM's
    ``_no_split_modules``, the transformers name of its repeated block, e.g. ``LlamaDecoderLayer``)."""
    inner = unwrap_model(model)
    llm = getattr(inner, "language_model", None)
    if class_names is None:
        class_names = getattr(llm, "_no_split_modules", None) or ()
    names = set(class_names)
    if llm is None or not names:
        raise ValueError("decoder_layers: expected a RadFM3DForCausalLM whose LLM names its decoder layer class "
                         "(`_no_split_modules`); pass class_names")
    return [m for m in llm.modules() if type(m).__name__ in names]


def shard_model(
    model: nn.Module, device: str | torch.device | None = None, precision: str = "auto",
    reshard_after_forward: bool = True, wrap_classes: Iterable[str] | None = None,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all ranks of the default process group and return it.

    Args:
        model: a ``RadFM3DForCausalLM`` after ``configure_stage`` (freeze switches and LoRA set), on the CPU or on
            ``device``. Each unit is moved to ``device`` as it is sharded, so the full model never needs to fit
            on one device.
        device: the device of this rank (default: the model's).
        precision: "auto" (bf16 compute on CUDA devices that support it, float32 on the CPU), "bf16" or "fp32".
            With bf16, parameters are all-gathered and used in bf16, gradients reduced in float32, the sharded
            parameters and optimizer state stay float32, and the logits are returned in float32.
        reshard_after_forward: free each gathered decoder layer after its forward (ZeRO-3; less memory, one more
            all-gather in backward); False keeps it until backward (ZeRO-2 like). The root unit always stays
            gathered from its forward to its backward.
        wrap_classes: decoder-layer class names (default: the LLM's ``_no_split_modules``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _require_process_group("shard_model")
    if is_sharded(model):
        return model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = autocast_dtype(device, precision)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reduce = torch.float32 if dtype is not None else None
    # each layer keeps its output in the compute dtype (the next layer's input); only the root casts to float32
    layer_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce)
    root_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce,
                                       output_dtype=torch.float32 if dtype is not None else None)
    # a parameter-free copy (meta tensors) of the unsharded model, filled by the export (see unsharded_copy)
    object.__setattr__(model, _SKELETON, _meta_skeleton(model))
    layers = decoder_layers(model, wrap_classes)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=layer_policy, reshard_after_forward=reshard_after_forward)
    # every rank must reduce the same units in the same order: a unit's gradient reduction fires when the gradient
    # reaches its input, so the first layer's input must require grad also when nothing before it trains on this
    # rank (a text-only batch under a frozen token table); the root's parameters get a zero term (see the hook)
    llm = getattr(unwrap_model(model), "language_model", None)
    if llm is not None and hasattr(llm, "enable_input_require_grads"):
        llm.enable_input_require_grads()
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root_names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_layers]
    # the root stays gathered from its forward to its backward (needed first in backward; PyTorch's advice)
    fully_shard(model, mesh=mesh, mp_policy=root_policy, reshard_after_forward=False)
    model.register_forward_hook(_EveryRootParameter(root_names), with_kwargs=True)
    local, total = parameter_counts(model)
    logger.info(f"FSDP: {len(layers)} decoder layers + root sharded over {dist.get_world_size()} ranks "
                f"({device.type}, compute {dtype or torch.float32}); this rank holds {local:,} of {total:,} "
                "parameter elements")
    return model


class _EveryRootParameter:
    """Forward hook of the root unit: adds ``0 x`` one element of each trainable root parameter to the logits (and
    the loss), so that on every rank each of them gets a gradient (zeros where the batch did not use it).

    FSDP2 reduce-scatters, per unit, the parameters that have a gradient on that rank. A batch that skips a part
    on one rank only (text-only records do not run the vision encoder and resampler) would leave the ranks with
    different collectives: an error with gloo, a hang or wrong gradients with NCCL (what DDP's
    ``find_unused_parameters`` covers). The added term is exactly zero, so no value changes.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        logits = getattr(output, "logits", None)
        if not self.names or logits is None or not torch.is_grad_enabled():
            return output
        # during the root's forward its parameters are the gathered (plain) ones
        zero = torch.stack([module.get_parameter(n).reshape(-1)[0].float() for n in self.names]).sum() * 0.0
        output.logits = logits + zero.to(logits.dtype)
        if getattr(output, "loss", None) is not None:
            output.loss = output.loss + zero.to(output.loss.dtype)
        return output


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(elements of the parameters held by this rank, elements of the whole model) - sharded ``DTensor``
    parameters count their local shard; plain parameters count in full on every rank."""
    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local, total


def gather_full_state(model: nn.Module, ranks0_only: bool = True) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict as CPU tensors: on rank 0 only (``ranks0_only``; the other ranks
    get ``{}``) or on every rank. Collective: every rank must call it. Gathered unit by unit
    (``torch.distributed.checkpoint.state_dict.get_model_state_dict``), so a device never holds the whole model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=ranks0_only)
    state = get_model_state_dict(model, options=options)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in state.items()}


def _plain_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class (``fully_shard`` swaps in a subclass ``FSDP<Name>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def _meta_skeleton(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` whose parameters and buffers are meta tensors (no memory): the deepcopy memo maps
    each tensor to its meta twin, so the structure, config, adapters and any other attribute (a findings model's
    schema and tokenizer) are copied, the weights are not. Tied parameters stay tied."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) not in memo:
            meta = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) \
                if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def unsharded_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (not sharded) model of the same class, config and LoRA adapters holding ``state`` (a full state
    dict, e.g. from :func:`gather_full_state`), filled with ``load_state_dict(assign=True)`` so the tensors of
    ``state`` are used as they are (no second copy). The structure is the meta copy :func:`shard_model` kept;
    for a model sharded otherwise, ``cls(config)`` (+ the LLM's LoRA config) on the meta device."""
    inner = unwrap_model(model)
    plain = inner.__dict__.get(_SKELETON)
    if plain is None:
        with torch.device("meta"):
            plain = _plain_class(inner)(inner.config)
            peft_config = getattr(getattr(inner, "language_model", None), "peft_config", None)
            if peft_config:
                plain.add_lora(next(iter(peft_config.values())))
        params = dict(plain.named_parameters())
        for name, p in inner.named_parameters():  # the same trainable set
            params[name].requires_grad_(p.requires_grad)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.train(inner.training)


def export_sharded_model(model: nn.Module, out_dir: str | os.PathLike, processor: Any = None) -> Path | None:
    """Gather the full state on rank 0 and write it with ``save_pretrained`` (+ processor) into ``out_dir``, each
    file atomically (``radfm3d.engine.training.save_trained_model``). Collective; returns the folder on rank 0,
    None elsewhere. Rank 0 needs CPU memory for the full state (what ``save_pretrained`` writes is a subset)."""
    state = gather_full_state(model, ranks0_only=True)
    path = None
    if dist_info()[0] == 0:
        plain = unsharded_copy(model, state)
        path = save_trained_model(plain, out_dir, processor)
        plain.to_empty(device="meta")  # let the gathered tensors go
        del state
    if dist.is_initialized():
        dist.barrier()
    return path


def list_sharded_checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint_<iteration>/`` folders of ``save_dir`` (committed ones), newest first."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _DIR_RE.match(p.name)) and p.is_dir())
    return [p for _, p in reversed(found)]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _all_ok(flag: bool) -> bool:
    """True when ``flag`` holds on every rank."""
    if not dist.is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


class ShardedCheckpointer(TrainingCheckpointer):
    """:class:`~radfm3d.engine.handlers.TrainingCheckpointer` for a model sharded by :func:`shard_model`.

    A checkpoint is the folder ``save_dir/checkpoint_<iteration>/``:

    - ``*.distcp`` + ``.metadata``: model and optimizer state, written by ``torch.distributed.checkpoint``, every
      rank its own shards (no gather; the files can be loaded at another world size by DCP). The model part is
      the full state, or only the trainable parameters when the LLM is a named base (``save_frozen="auto"``, as in
      the parent class: the frozen base is read again from its files).
    - ``trainer_rank<r>.pt`` (``torch.load(weights_only=True)``-safe): iteration, epoch, LR scheduler, the sampler
      and the RNG states of rank r (each rank draws its own dropout masks).

    All ranks write into ``.checkpoint_<iteration>.partial/``; after a barrier rank 0 renames it to the final name
    (one ``os.replace``, atomic on a POSIX file system that all ranks share), so a folder with the final name is
    complete. On ``STARTED`` the newest folder that every rank can read is loaded; an unreadable newer one is named
    in a warning and skipped. Resuming needs the world size it was saved with (the data order and the per-rank RNG
    states depend on it). The export (``COMPLETED``) gathers the full state on rank 0 and calls ``save_pretrained``.
    Every method here is collective: every rank must call it (the handler is attached on all ranks).
    """

    def _state_options(self, **extra: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        full = self._full_state()
        # without the frozen parameters, loading is not strict (they come from the base LLM's files)
        return StateDictOptions(ignore_frozen_params=not full, strict=full, **extra)

    def _dcp_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.network, self.optimizer, options=self._state_options())
        return {"model": model_state, "optimizer": optim_state}

    # -- save
    def save(self, engine: Engine) -> Path | None:  # type: ignore[override]
        """Write ``checkpoint_<iteration>/`` (all ranks their shards and progress file; rank 0 commits) and prune
        older ones. Returns the folder on every rank."""
        import torch.distributed.checkpoint as dcp

        _require_process_group("ShardedCheckpointer.save")
        iteration = int(engine.state.iteration)
        if iteration == self._last_saved:
            return None
        self._last_saved = iteration
        rank, world = dist_info()
        final = self.save_dir / f"checkpoint_{iteration:08d}"
        partial = self.save_dir / f".checkpoint_{iteration:08d}.partial"
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        dcp.save(self._dcp_state(), checkpoint_id=str(partial))
        progress = self.progress_state(engine)
        progress.update(rank=rank, full_state=self._full_state())
        atomic_torch_save(progress, partial / _RANK_FILE.format(rank=rank))
        dist.barrier()
        if rank == 0:
            if final.exists():  # the same iteration saved by an earlier (stopped) run
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(self.save_dir)
            for old in list_sharded_checkpoints(self.save_dir)[self.keep_last:]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info(f"sharded checkpoint saved: {final} (iteration {iteration}, epoch {engine.state.epoch}, "
                        f"{world} ranks)")
        dist.barrier()
        return final

    # -- load
    def _read_progress(self, folder: Path) -> dict[str, Any]:
        """This rank's progress file of ``folder``, checked; ``RadFM3DInputError`` naming the problem."""
        rank, world = dist_info()
        path = folder / _RANK_FILE.format(rank=rank)
        if not (folder / ".metadata").is_file():
            raise RadFM3DInputError(folder, "sharded checkpoint without .metadata (not written by DCP)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise RadFM3DInputError(path, "missing progress file of this rank") from None
        except pickle.UnpicklingError:
            raise RadFM3DInputError(path, "corrupt progress file (not a torch file, or content that weights_only "
                                    "loading refuses)") from None
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RadFM3DInputError(path, f"corrupt progress file ({type(err).__name__}: {first})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise RadFM3DInputError(path, "not a radfm3d training progress file")
        if int(state.get("world_size", -1)) != world:
            raise RadFM3DInputError(folder, f"saved with {state.get('world_size')} ranks, this run has {world}: "
                                    "resume with the same --nproc_per_node (or start over with resume=false)")
        return state

    def load(self, engine: Engine) -> Path | None:  # type: ignore[override]
        """Load the newest checkpoint folder that every rank reads into the sharded model and optimizer, then the
        scheduler, engine counters, sampler position and this rank's RNG states."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        _require_process_group("ShardedCheckpointer.load")
        if dist_info()[0] == 0 and self.save_dir.is_dir():  # partial folders of a stopped writer
            for p in self.save_dir.iterdir():
                if _PARTIAL_RE.match(p.name):
                    shutil.rmtree(p, ignore_errors=True)
        dist.barrier()
        self.skipped = []
        candidates = list_sharded_checkpoints(self.save_dir)
        for folder in candidates:
            problem = ""
            try:
                progress = self._read_progress(folder)
            except RadFM3DInputError as err:  # name the file inside the folder when it is one
                source = Path(str(err.source))
                problem = err.problem if source == folder else f"{source.name}: {err.problem}"
            if not _all_ok(not problem):
                self.skipped.append((folder, problem or "unreadable on another rank"))
                logger.warning(f"skipping {folder}: {problem or 'unreadable on another rank'}")
                continue
            if bool(progress.get("full_state")) != self._full_state():
                raise RadFM3DInputError(folder, "checkpoint holds a different part of the model (full state vs "
                                        "trainable only); was the base LLM changed?")
            state = self._dcp_state()
            try:
                dcp.load(state, checkpoint_id=str(folder))
            except Exception as err:  # noqa: BLE001 - DCP raises on every rank when any rank fails to read
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                self.skipped.append((folder, first))
                logger.warning(f"skipping {folder}: {first}")
                continue
            result = set_state_dict(self.network, self.optimizer, model_state_dict=state["model"],
                                    optim_state_dict=state["optimizer"], options=self._state_options())
            trainable = {n for n, p in self.network.named_parameters() if p.requires_grad}
            lost = sorted(trainable & set(getattr(result, "missing_keys", ())))
            if lost:
                raise RadFM3DInputError(folder, f"checkpoint lacks trainable parameters {lost[:5]}; was the stage "
                                        "or the model changed?")
            self.restore_progress(engine, progress, folder)
            return folder
        if candidates:
            raise RadFM3DInputError(self.save_dir, "no readable sharded checkpoint: " + "; ".join(
                f"{p.name}: {why}" for p, why in self.skipped) + " (delete the folder or pass resume=false to "
                "start over)")
        return None

    # -- export
    def export(self, engine: Engine | None = None) -> Path | None:  # type: ignore[override]
        """Gather the full state on rank 0 and ``save_pretrained`` it (+ processor) into ``export_dir``."""
        if self.export_dir is None:
            return None
        started = time.monotonic()
        path = export_sharded_model(self.network, self.export_dir, self.processor)
        if path is not None:
            logger.info(f"trained model exported to {path} ({time.monotonic() - started:.1f} s)")
        return path

"""Load a teacher: its model on the device, its tokenizer, its identity and vocabulary sizes.

Teachers: a local Hugging Face directory (``AutoModelForCausalLM``; with ``teacher_file="X.gguf"``
the GGUF file in it, through transformers' GGUF loader), or ``"module.path:factory"``, a callable
returning ``(model, tokenizer_or_None)``. :class:`TeacherIdentity` (name, revision when known,
sha256 of the weight files, or of the state_dict tensors for a factory) goes into the manifest.

**Padded vocabulary.** Models often pad their output layer (152064 rows for a 151936-token
tokenizer). The real vocabulary is ``len(tokenizer)`` (or ``real_vocab_size``); the padded rows are
sliced off the output projection before the matmul, so padded ids are never candidates *and* are
not in the normaliser: log-probs are normalised over the real vocabulary, the distribution the
teacher actually defines over tokens that exist (padded logits are arbitrary, often not -inf).

The output head is split off and probed at load time (:mod:`logitcache.dump.head`); the
sparsify step (:mod:`logitcache.dump.sparsify`) then applies it chunk by chunk.

**Tensor parallel** (``group`` with ``tensor_parallel > 1``): the teacher is loaded with Hugging
Face's own tensor-parallel plan (``DistributedConfig(tp_size=T)``) on this rank's ``tp`` sub-mesh,
so each rank materialises only its shard of every sharded weight. Transformers 5 builds its mesh
over the whole world; for ``W/T`` data-parallel groups the loader hands it the ``(pp=1,
dp_replicate=W/T, fsdp=1, tp=T)`` mesh instead (a subclass overriding ``prepare_distribute_model``,
the one hook it has) while keeping ``dp_size=1`` in the config, so no FSDP wrapping happens: each
data-parallel group holds a plain tensor-parallel replica. Measured on the tiny Llama (2 x 2 on
gloo): logits equal the single-process ones to 4e-6, parameters per rank 0.50 of the whole model.
The head is then split into vocabulary shards (:func:`~logitcache.dump.head.split_sharded_head`).

**Device map** (``device_map="auto"``, ``max_memory``): Accelerate's big-model inference, through
``from_pretrained``: layers fill the GPUs in order, then CPU RAM, then disk (a temporary offload
folder), and each runs on the first GPU (or the CPU) with its weights brought in by hooks. Slow
where offloaded, but exact. The head then runs through its module (its weight may be on ``meta``),
still chunk by chunk; the teacher's ``device`` is where the head's logits land.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from logitcache._distributed import RankGroup, resolve_device
from logitcache.dump.head import (
    ShardedHead,
    SplitHead,
    forward_logits,
    split_head,
    split_sharded_head,
)
from logitcache.errors import ConfigError, TeacherError

__all__ = ["Teacher", "TeacherIdentity", "load_teacher", "resolve_dtype", "teacher_from_model"]

_WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on cuda, fp32 elsewhere (bf16 matmuls on CPU are slow and no more exact)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected auto, bf16, fp16 or fp32")
    return _DTYPES[dtype]


def hash_files(paths: list[str]) -> str:
    """sha256 over (file name, size, content) of each file, in the given (sorted) order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(b"\0file\0" + os.path.basename(path).encode())
        h.update(str(os.path.getsize(path)).encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def hash_state_dict(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state_dict tensor, sorted by name."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().reshape(-1).contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class TeacherIdentity:
    """Who the teacher is, for the manifest and for refusing a resume with another teacher."""

    name: str
    revision: str | None
    weights_sha256: str | None
    source: Literal["hf", "gguf", "factory", "model"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class Teacher:
    """A loaded teacher: model on ``device``, optional tokenizer, vocab sizes, and its head."""

    model: torch.nn.Module
    tokenizer: Any | None
    identity: TeacherIdentity
    padded_vocab_size: int
    real_vocab_size: int
    device: torch.device
    max_seq_len: int | None
    head: SplitHead | None  # None: full-logits fallback
    # device buffers the sparsify step reuses from batch to batch (a fresh 100 MB+ buffer per
    # batch costs its page faults again on a CPU); see :meth:`scratch`
    buffers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def sharded_head(self) -> ShardedHead | None:
        """The vocabulary shard of a tensor-parallel teacher (None otherwise)."""
        return self.head if isinstance(self.head, ShardedHead) else None

    def parameter_bytes(self) -> int:
        """Bytes of parameters held in memory by this process: a tensor-parallel shard counts
        locally, a parameter offloaded to disk by a device map (on ``meta``) not at all."""
        total = 0
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.device.type != "meta":
                total += local.numel() * local.element_size()
        return total

    def scratch(self, name: str, numel: int) -> torch.Tensor:
        """A flat float32 device buffer of at least ``numel`` elements, kept for the next call."""
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            self.buffers.pop(name, None)  # free the old one before allocating the larger one
            buf = self.buffers[name] = torch.empty(numel, device=self.device)
        return buf[:numel]


def load_teacher(
    spec: str,
    *,
    teacher_file: str | None = None,
    tokenizer: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    real_vocab_size: int | None = None,
    hash_weights: bool = True,
    group: RankGroup | None = None,
    device_map: str | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
) -> Teacher:
    """Load a teacher from a HF directory (optionally its GGUF ``teacher_file``) or a factory.

    ``dtype``: auto (bf16 on cuda, fp32 on cpu) | bf16 | fp16 | fp32. ``device``: auto (cuda,
    ``cuda:$LOCAL_RANK`` under torchrun, else cpu) or a torch device string. ``tokenizer``
    overrides where the tokenizer is loaded from. ``group``: a :class:`RankGroup` whose layout
    has ``tensor_parallel > 1`` loads this rank's shard (see the module docstring).
    ``device_map="auto"`` (with ``max_memory``, e.g. ``{0: "20GiB", "cpu": "60GiB"}``) spreads a
    Hugging Face directory teacher over the visible GPUs, CPU and disk.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if group is not None and group.layout.tensor_parallel > 1:
        return _load_tensor_parallel(
            spec, teacher_file, tokenizer, dt, dev, real_vocab_size, hash_weights, group
        )
    placement: dict[str, Any] = {}
    if device_map is not None:
        if device_map != "auto":
            raise ConfigError(f"device_map must be 'auto', got {device_map!r}")
        if not os.path.isdir(spec):
            raise ConfigError(
                f"--device-map auto loads a Hugging Face model directory; {spec!r} is not one"
            )
        folder = tempfile.mkdtemp(prefix="logitcache-offload-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        placement = {"device_map": "auto", "offload_folder": folder}
        if max_memory:
            placement["max_memory"] = dict(max_memory)
    elif max_memory:
        raise ConfigError("--max-memory applies to --device-map auto; add --device-map auto")
    if os.path.isdir(spec):
        return _load_hf(
            spec, teacher_file, tokenizer, dt, dev, real_vocab_size, hash_weights, placement
        )
    if _FACTORY.match(spec):
        model, tok = _call_factory(spec)
        if tokenizer is not None:
            tok = _load_tokenizer(tokenizer, None, explicit=True)
        if dtype != "auto":
            model = model.to(dtype=dt)
        digest = hash_state_dict(model) if hash_weights else None
        ident = TeacherIdentity(spec, None, digest, "factory")
        return teacher_from_model(model, tok, ident, device=dev, real_vocab_size=real_vocab_size)
    raise TeacherError(
        f"teacher {spec!r} is neither a directory nor a 'module.path:factory' spec; give a local "
        "Hugging Face model directory or a factory returning (model, tokenizer)"
    )


def _load_hf(
    path: str,
    teacher_file: str | None,
    tokenizer: str | None,
    dt: torch.dtype,
    dev: torch.device,
    real_vocab_size: int | None,
    hash_weights: bool,
    placement: dict[str, Any] | None = None,
) -> Teacher:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dt, **(placement or {})}
    files = sorted(f for f in os.listdir(path) if f.endswith(_WEIGHT_EXTS))
    if teacher_file is not None:
        if not os.path.isfile(os.path.join(path, teacher_file)):
            raise TeacherError(f"teacher file {teacher_file!r} not found in {path}; found {files}")
        kwargs["gguf_file"] = teacher_file
        files = [teacher_file]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError:
        # torch.load(weights_only=True) refused a pickle that would run code: say so in one line
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
        raise TeacherError(
            f"the teacher's weights in {path} ({', '.join(pickles) or 'a weights file'}) hold a "
            "pickle that does not load as plain tensors (weights_only=True refused it; loading "
            "it would run code); get the weights as .safetensors, or re-save them from a "
            "trusted copy"
        ) from None
    except (OSError, ValueError, ImportError) as e:
        raise TeacherError(f"cannot load the teacher from {path}: {e}") from e
    tok = _load_tokenizer(
        tokenizer or path, None if tokenizer else teacher_file, tokenizer is not None
    )
    real = os.path.realpath(path)
    snap = re.search(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})", real)
    name = f"{snap.group(1)}/{snap.group(2)}" if snap else os.path.basename(real)
    revision = snap.group(3) if snap else getattr(model.config, "_commit_hash", None)
    digest = hash_files([os.path.join(path, f) for f in files]) if hash_weights else None
    ident = TeacherIdentity(name, revision, digest, "gguf" if teacher_file else "hf")
    if placement:
        dev = _head_device(getattr(model, "hf_device_map", None) or {})
    return teacher_from_model(
        model, tok, ident, device=dev, real_vocab_size=real_vocab_size, placed=bool(placement)
    )


def _head_device(device_map: dict[str, Any]) -> torch.device:
    """Where Accelerate runs the output head: its GPU, else the first GPU of the map (offloaded
    modules execute there), else the CPU."""
    gpus = [d for d in device_map.values() if isinstance(d, int)]
    head = next((d for name, d in device_map.items() if name in ("lm_head", "")), None)
    if isinstance(head, int):
        return torch.device("cuda", head)
    return torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")


def _load_tensor_parallel(
    spec: str,
    teacher_file: str | None,
    tokenizer: str | None,
    dt: torch.dtype,
    dev: torch.device,
    real_vocab_size: int | None,
    hash_weights: bool,
    group: RankGroup,
) -> Teacher:
    """This rank's tensor-parallel shard of a Hugging Face directory teacher."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed.configuration_utils import DistributedConfig
    from transformers.distributed.utils import TransformersDeviceMesh

    t, dp = group.layout.tensor_parallel, group.layout.data_parallel
    if not os.path.isdir(spec) or teacher_file is not None:
        raise ConfigError(
            f"--tensor-parallel {t} loads a Hugging Face model directory (safetensors) with its "
            f"tensor-parallel plan; {spec!r}{' with --teacher-file' if teacher_file else ''} is "
            "not one. Save the model with save_pretrained, or dump without --tensor-parallel"
        )
    try:
        config = AutoConfig.from_pretrained(spec)
        cls: Any = AutoModelForCausalLM._model_mapping[type(config)]
    except (OSError, ValueError, KeyError) as e:
        raise TeacherError(f"cannot load the teacher's config from {spec}: {e}") from e
    text = getattr(config, "text_config", None) or config
    for field_name in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(text, field_name, None)
        if isinstance(n, int) and n % t:
            raise ConfigError(
                f"--tensor-parallel {t} must divide the teacher's {field_name} ({n}): each rank "
                f"holds whole heads; use a --tensor-parallel that divides {n}"
            )
    if not (getattr(text, "base_model_tp_plan", None) or getattr(cls, "_tp_plan", None)):
        raise ConfigError(
            f"the teacher {type(config).__name__} has no tensor-parallel plan "
            "(base_model_tp_plan), so --tensor-parallel cannot shard it; dump without "
            "--tensor-parallel on a device it fits (--device-map auto is planned, not yet here)"
        )
    names = ("pp", "dp_replicate", "fsdp", "tp")
    dense = init_device_mesh(dev.type, (1, dp, 1, t), mesh_dim_names=names)
    expert = init_device_mesh(
        dev.type, (1, dp, 1, t), mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep")
    )

    class _OnOurMesh(cls):
        @classmethod
        def prepare_distribute_model(cls, distributed_config: Any, device_map: Any = None) -> Any:
            return distributed_config, dev, TransformersDeviceMesh(dense, expert)

    _OnOurMesh.__name__ = _OnOurMesh.__qualname__ = cls.__name__
    try:
        model = _OnOurMesh.from_pretrained(
            spec, dtype=dt, distributed_config=DistributedConfig(tp_size=t)
        )
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        raise TeacherError(
            f"cannot load the teacher from {spec} with --tensor-parallel {t}: {e}"
        ) from e
    tok = _load_tokenizer(tokenizer or spec, None, tokenizer is not None)
    real = os.path.realpath(spec)
    snap = re.search(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})", real)
    name = f"{snap.group(1)}/{snap.group(2)}" if snap else os.path.basename(real)
    revision = snap.group(3) if snap else getattr(model.config, "_commit_hash", None)
    files = sorted(f for f in os.listdir(spec) if f.endswith(_WEIGHT_EXTS))
    # the writer (tensor-parallel rank 0) hashes the checkpoint; the others never use the digest
    hashed = hash_weights and group.layout.writes
    digest = hash_files([os.path.join(spec, f) for f in files]) if hashed else None
    ident = TeacherIdentity(name, revision, digest, "hf")
    return teacher_from_model(
        model, tok, ident, device=dev, real_vocab_size=real_vocab_size, tp_group=group.tp_group
    )


def _load_tokenizer(path: str, gguf_file: str | None, explicit: bool = False) -> Any | None:
    """The tokenizer at ``path``. One the user named (``--tokenizer``) must load: failing is an
    error; the teacher directory's own may be missing (token-id inputs need none)."""
    from transformers import AutoTokenizer

    try:
        if gguf_file:
            return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        if explicit:
            raise TeacherError(
                f"cannot load the tokenizer {path!r} given with --tokenizer "
                f"({' '.join(str(e).split())}); give a "
                "directory holding a Hugging Face tokenizer (tokenizer.json or its files), or "
                "leave --tokenizer out to use the teacher's own"
            ) from None
        warnings.warn(
            f"no tokenizer loaded from {path} ({e}); only token-id inputs will work", stacklevel=3
        )
        return None


def _call_factory(spec: str) -> tuple[torch.nn.Module, Any | None]:
    module_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise TeacherError(
            f"cannot import {module_name!r} for teacher factory {spec!r}: {e}"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TeacherError(f"{module_name!r} has no attribute {attr!r} (teacher {spec!r})")
        obj = getattr(obj, part)
    result = obj()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TeacherError(f"teacher factory {spec!r} must return (model, tokenizer_or_None)")
    if not isinstance(result[0], torch.nn.Module):
        raise TeacherError(
            f"teacher factory {spec!r} returned {type(result[0]).__name__}, not a torch.nn.Module"
        )
    return result[0], result[1]


def teacher_from_model(
    model: torch.nn.Module,
    tokenizer: Any | None,
    identity: TeacherIdentity | None = None,
    *,
    device: torch.device | str | None = None,
    real_vocab_size: int | None = None,
    tp_group: Any = None,
    placed: bool = False,
) -> Teacher:
    """Wrap an in-memory model (moved to ``device``), probe its head, settle the vocab sizes.
    ``tp_group``: the tensor-parallel group of a model sharded by its TP plan; ``placed``: a model
    spread by a device map. Both are left where they are."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = (model if tp_group is not None or placed else model.to(dev)).eval()
    if identity is None:
        identity = TeacherIdentity(type(model).__name__, None, hash_state_dict(model), "model")
    config = getattr(model, "config", None)
    max_len = getattr(config, "max_position_embeddings", None)
    probe = torch.arange(min(8, max_len or 8), device=dev, dtype=torch.long)[None, :]
    with torch.no_grad():
        reference = forward_logits(model, probe, None)
    padded = int(reference.shape[-1])
    real = real_vocab_size or (len(tokenizer) if tokenizer is not None else padded)
    if real > padded:
        if real_vocab_size is not None:
            raise ConfigError(f"real_vocab_size {real} exceeds the model's output size {padded}")
        warnings.warn(
            f"the tokenizer has {real} tokens but the model outputs {padded} logits; "
            f"ids >= {padded} can never be predicted, using {padded}",
            stacklevel=2,
        )
        real = padded
    head: SplitHead | None
    if tp_group is not None:
        head = split_sharded_head(model, real, probe, reference, tp_group)
    else:
        head = split_head(model, real, probe, reference)
    return Teacher(model, tokenizer, identity, padded, real, dev, max_len, head)

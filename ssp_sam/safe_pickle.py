"""Reading TorchScript weight archives (OpenAI's CLIP ``.pt``) without running anything they contain.

``torch.jit.load`` runs the archive's code (its classes' ``__setstate__`` methods and whatever its
pickles name), so a crafted file can act on the machine before any key check. This module reads
the same tensors with nothing executed:

- ``data.pkl`` (the pickled module tree) is unpickled by :class:`RestrictedUnpickler`, which can
  build only tensors (``torch._utils._rebuild_tensor_v2`` on storages read from the archive's
  ``data/`` records), ``OrderedDict``, plain containers and scalars, TorchScript's list builders,
  and objects of the archive's own ``__torch__.*`` classes, which become :class:`ScriptObject`
  attribute holders (no method of theirs exists, let alone runs). Any other global is refused.
- The archive's ``code/*.py`` files are parsed as text (``ast.parse``, never compiled or run) for
  each module class's ``__parameters__`` and ``__buffers__`` declarations, which say which tensor
  attributes belong in the state dict, exactly as ``torch.jit.load(...).state_dict()`` reports them.

Files written by ``torch.save`` are not read here: ``torch.load(weights_only=True)`` already
restricts them (see :mod:`ssp_sam.weight_files`).
"""

from __future__ import annotations

import ast
import collections
import math
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError, first_line

# Legacy storage class names that torch's picklers write into each storage's persistent id.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
_SCRIPT_PREFIX = "__torch__"


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something other than tensors, plain containers and TorchScript objects."""


@dataclass(frozen=True)
class _StorageKind:
    """What a ``torch.<Type>Storage`` global stands for in a persistent id: only its dtype."""

    dtype: torch.dtype


class ScriptObject:
    """An object of a TorchScript class from an archive, reduced to its pickled attributes.

    ``qualified_name`` (e.g. "__torch__.torch.nn.modules.linear.Linear") is set on the per-class
    subclass the unpickler makes; ``attributes`` maps attribute names to their unpickled values.
    """

    qualified_name = ""

    def __new__(cls, *args: Any) -> ScriptObject:
        if args:
            raise UnsafePickleError(f"{cls.qualified_name} built with arguments")
        instance = super().__new__(cls)
        instance.attributes = {}
        return instance

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
            raise UnsafePickleError(f"{self.qualified_name} is restored by its own __setstate__ code, which is never run")
        self.attributes = state


def _rebuild_tensor(
    storage: Tensor, offset: int, size: tuple, stride: tuple, requires_grad: bool, hooks: Any, metadata: Any = None
) -> Tensor:
    """A view of a storage (1-D tensor) as torch's ``_rebuild_tensor_v2`` builds it, bounds checked."""
    if not isinstance(storage, Tensor) or storage.dim() != 1:
        raise UnsafePickleError("tensor without a storage")
    if not (
        isinstance(offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(value, int) and value >= 0 for value in (offset, *size, *stride))
    ):
        raise UnsafePickleError("tensor with a malformed offset, size or stride")
    if hooks or metadata:
        raise UnsafePickleError("tensor with backward hooks or Python attributes")
    if math.prod(size) > 0 and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel():
        raise UnsafePickleError(f"tensor of size {size} reaches past its storage of {storage.numel()} values")
    return storage.as_strided(size, stride, offset)


def _as_list(values: Any) -> list:
    """TorchScript's ``build_intlist`` / ``build_tensorlist`` / ...: the values as a list."""
    return list(values)


def _restore_type_tag(value: Any, type_string: str) -> Any:
    """TorchScript's ``restore_type_tag`` only annotates a container's element type: drop it."""
    return value


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _as_list,
    ("torch.jit._pickle", "build_doublelist"): _as_list,
    ("torch.jit._pickle", "build_boollist"): _as_list,
    ("torch.jit._pickle", "build_tensorlist"): _as_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    **{("torch", name): _StorageKind(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's ``data.pkl``: tensors, plain data and ``__torch__`` objects only.

    Every class or function a pickle can call comes from :meth:`find_class`, which returns only the
    harmless stand-ins of ``_ALLOWED_GLOBALS`` and :class:`ScriptObject` subclasses; storages come
    from :meth:`persistent_load`, which reads bytes from the archive's ``data/`` records.
    """

    def __init__(self, file: Any, archive: zipfile.ZipFile, data_prefix: str) -> None:
        super().__init__(file)
        self._archive = archive
        self._data_prefix = data_prefix
        self._storages: dict[str, Tensor] = {}
        self._script_classes: dict[str, type[ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module == _SCRIPT_PREFIX or module.startswith(_SCRIPT_PREFIX + "."):
            qualified = f"{module}.{name}"
            if qualified not in self._script_classes:
                self._script_classes[qualified] = type("ScriptObject", (ScriptObject,), {"qualified_name": qualified})
            return self._script_classes[qualified]
        raise UnsafePickleError(f"the pickle asks for {module}.{name}")

    def persistent_load(self, pid: Any) -> Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unknown persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageKind) or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise UnsafePickleError(f"malformed storage reference {str(pid)[:80]}")
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, kind.dtype, numel)
        storage = self._storages[key]
        if storage.dtype != kind.dtype or storage.numel() != numel:
            raise UnsafePickleError(f"storage {key} referenced with two different types or sizes")
        return storage

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> Tensor:
        name = f"{self._data_prefix}{key}"
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise UnsafePickleError(f"storage record {name} is missing") from None
        if info.file_size < nbytes:
            raise UnsafePickleError(f"storage record {name} holds {info.file_size} bytes, {nbytes} expected")
        with self._archive.open(info) as record:
            raw = bytearray(record.read(nbytes))
        return torch.frombuffer(raw, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)


# ----------------------------------------------------------------------------- TorchScript archives


def _archive_prefix(archive: zipfile.ZipFile) -> str | None:
    """The top folder of a TorchScript archive ("ViT-B-16/"), or None if it is not one.

    TorchScript archives hold ``<name>/data.pkl`` beside ``<name>/constants.pkl`` and a ``code/``
    folder; ``torch.save`` zips have no constants.pkl.
    """
    names = set(archive.namelist())
    prefixes = [name[: -len("data.pkl")] for name in names if name.endswith("data.pkl") and name.count("/") == 1]
    script = [prefix for prefix in prefixes if f"{prefix}constants.pkl" in names]
    return script[0] if len(script) == 1 else None


# What zipfile raises on a damaged archive directory (found by corrupting torch.save files' central
# directories byte by byte): BadZipFile mostly, UnicodeDecodeError (a ValueError) for a name flagged UTF-8
# that is not, NotImplementedError for a garbled "version needed", OSError for a seek before the start.
_DAMAGED_ZIP_ERRORS = (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, OverflowError)


def is_torchscript_archive(path: str | os.PathLike, what: str = "weight file") -> bool:
    """Whether ``path`` is a TorchScript archive (as written by ``torch.jit.save``).

    A zip whose directory cannot be read is refused here rather than answered False: ``torch.load``'s
    own reader tolerates some such damage and would load what it still finds (or say nothing useful),
    and a file damaged in one place is not trusted in the others.

    Raises:
        CheckpointError: "<file>: not a readable <what> (damaged zip archive: ...)".
    """
    try:
        if not zipfile.is_zipfile(path):  # reads the end record, which can itself be damaged
            return False
        with zipfile.ZipFile(path) as archive:
            return _archive_prefix(archive) is not None
    except _DAMAGED_ZIP_ERRORS as error:
        raise CheckpointError(f"{path}: not a readable {what} (damaged zip archive: {first_line(error)})") from None


@dataclass(frozen=True)
class _ModuleDeclaration:
    parameters: frozenset[str]
    buffers: frozenset[str]


def _module_declarations(archive: zipfile.ZipFile, prefix: str) -> dict[str, _ModuleDeclaration]:
    """Parameter and buffer names of every module class in the archive's code, by qualified name.

    The code is parsed, never compiled or run. ``code/__torch__/a/b.py`` defines the classes of
    ``__torch__.a.b``; a module class is one whose bases include ``Module``.
    """
    code = f"{prefix}code/"
    declarations = {}
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code) : -len(".py")].replace("/", ".")
        tree = ast.parse(archive.read(name).decode("utf-8"), filename=name)
        for node in tree.body:
            if not isinstance(node, ast.ClassDef) or not any(getattr(base, "id", None) == "Module" for base in node.bases):
                continue
            lists = {"__parameters__": [], "__buffers__": []}
            for statement in node.body:
                if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
                    target = getattr(statement.targets[0], "id", None)
                    if target in lists:
                        lists[target] = ast.literal_eval(statement.value)
            declarations[f"{module}.{node.name}"] = _ModuleDeclaration(
                frozenset(lists["__parameters__"]), frozenset(lists["__buffers__"])
            )
    return declarations


def _collect_state_dict(
    obj: ScriptObject, prefix: str, declarations: dict[str, _ModuleDeclaration], out: dict[str, Tensor]
) -> None:
    """Parameters, then buffers, then submodules, recursively: the order of ``Module.state_dict``."""
    declaration = declarations.get(obj.qualified_name)
    if declaration is None:
        raise UnsafePickleError(f"module class {obj.qualified_name} is not declared in the archive's code")
    for kind in (declaration.parameters, declaration.buffers):
        for name, value in obj.attributes.items():
            if name not in kind or value is None:
                continue
            if not isinstance(value, Tensor):
                raise UnsafePickleError(f"{prefix}{name} is declared a tensor but holds {type(value).__name__}")
            out[prefix + name] = value
    for name, value in obj.attributes.items():
        if isinstance(value, ScriptObject) and value.qualified_name in declarations:
            _collect_state_dict(value, f"{prefix}{name}.", declarations, out)


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of a TorchScript archive's module, read without executing the archive.

    Equal (keys, dtypes and values) to ``torch.jit.load(path, map_location="cpu").state_dict()``.

    Raises:
        CheckpointError: naming the file, if it is not a readable TorchScript archive or asks for
            anything but tensors, plain containers and its own module objects.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive)
            if prefix is None:
                raise CheckpointError(f"{path}: not a TorchScript archive (no data.pkl beside constants.pkl)")
            byteorder = f"{prefix}byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
                raise CheckpointError(f"{path}: big-endian TorchScript archives are not supported")
            declarations = _module_declarations(archive, prefix)
            with archive.open(f"{prefix}data.pkl") as file:
                root = RestrictedUnpickler(file, archive, f"{prefix}data/").load()
            if not isinstance(root, ScriptObject):
                raise UnsafePickleError(f"data.pkl holds {type(root).__name__}, not a TorchScript module")
            state: dict[str, Tensor] = {}
            _collect_state_dict(root, "", declarations, state)
            return state
    except UnsafePickleError as error:
        raise CheckpointError(
            f"{path}: refused, {error} (weight files may hold only tensors and plain containers; nothing was run)"
        ) from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, SyntaxError, ValueError, TypeError, KeyError,
            AttributeError, IndexError, EOFError, RecursionError, UnicodeDecodeError, RuntimeError, OSError,
            zlib.error) as error:  # zlib.error: a record whose damaged header says it is deflated
        raise CheckpointError(f"{path}: not a readable TorchScript archive ({first_line(error)})") from None

"""Build the model named by a config's ``model`` section: a torchvision builder or a user entrypoint.

Weights come from a torchvision weights enum member (downloaded through torch.hub), a local state_dict or
checkpoint file, or nowhere (a seeded random init, reproducible from ``run.seed``). Every failure a user can
cause (a typo in a name, a missing file, keys that do not fit, no network) is one ConfigError line naming the
key and the value; ``--debug`` keeps the chained original exception.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import pickle
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from lrpcli.errors import ConfigError
from lrpcli.spec.config import Config, channels, did_you_mean, resolve_path, show

__all__ = ["load_model", "input_shape", "check_model_name", "load_weights_file", "extract_state_dict",
           "model_fingerprint"]

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".safetensors")
_ENUM_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


class _Where:
    """Error factory for one model section: ``<file>: model.<key>: <message>``."""

    def __init__(self, source: str):
        self.source = source

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: model.{key}: {message}")

    def fail(self, key: str, message: str) -> NoReturn:
        raise self.error(key, message)


def check_model_name(name: str, fail: Callable[[str], NoReturn]) -> None:
    """Fail (via ``fail(message)``) unless ``name`` is a torchvision model builder; suggest close names."""
    import torchvision.models as tvm

    available = tvm.list_models()
    if name in available:
        return
    close = difflib.get_close_matches(name.lower(), available, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else f"{len(available)} models, e.g. resnet18, vgg16"
    fail(
        f"unknown torchvision model {show(name)} ({hint}; torchvision.models.list_models() lists all, "
        "or use model.entrypoint for your own)"
    )


def load_model(
    model_cfg: Mapping[str, Any], base_dir: str | Path | None = None, *, seed: int = 0
) -> nn.Module:
    """The model of ``model_cfg`` (the ``model`` section, or a whole Config), in eval mode, on the CPU.

    A whole Config also supplies ``base_dir`` and ``run.seed``. The seed makes a random init reproducible
    without touching the caller's global RNG state.
    """
    if "model" in model_cfg and isinstance(model_cfg["model"], Mapping):
        root = model_cfg
        model_cfg = root["model"]
        if base_dir is None and isinstance(root, Config):
            base_dir = root.base_dir
        seed = int(root.get("run", {}).get("seed", seed))
    if base_dir is None and isinstance(model_cfg, Config):
        base_dir = model_cfg.base_dir
    where = _Where(model_cfg.source if isinstance(model_cfg, Config) else "config")
    name, entry = model_cfg.get("name"), model_cfg.get("entrypoint")
    weights = model_cfg.get("weights")
    kwargs = dict(model_cfg.get("kwargs") or {})
    if (name is None) == (entry is None):
        where.fail("name", "needs exactly one of model.name or model.entrypoint")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name is not None:
            model = _build_torchvision(name, weights, kwargs, base_dir, where)
        else:
            model = _build_entrypoint(entry, weights, kwargs, base_dir, where)
    return model.eval()


def model_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` over every parameter and buffer (name, dtype, shape and raw bytes, in state_dict order).

    Stored with a run's file so that ``--resume`` can tell whether the model it builds now is the one that wrote
    the rows already there (a changed weights file, a random init with another seed); equal models give equal
    fingerprints on any machine with the same byte order.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


def input_shape(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of one preprocessed input: C from input.mode, H = W = crop (else resize, as a square).

    Used where no image fixes the size (synthetic inputs for ``lrpcli debug``); without crop and resize the
    size is unknown, which is a ConfigError.
    """
    inp = config["input"]
    size = inp.get("crop") or inp.get("resize")
    if size is None:
        source = config.source if isinstance(config, Config) else "config"
        raise ConfigError(
            f"{source}: input.crop: null, and so is input.resize; set input.crop to give the input size"
        )
    return channels(inp.get("mode", "RGB")), int(size), int(size)


# ------------------------------------------------------------------------------------------- torchvision
def _build_torchvision(
    name: str, weights: str | None, kwargs: dict, base_dir: Any, where: _Where
) -> nn.Module:
    import torchvision.models as tvm

    check_model_name(name, lambda msg: where.fail("name", msg))
    builder = tvm.get_model_builder(name)
    weights_file = member = None
    if weights is not None:
        weights_file = resolve_path(weights, base_dir)
        if weights_file is None:
            member = _weights_member(name, weights, base_dir, where)
    if member is not None:
        model = _call_pretrained(builder, name, member, kwargs, where)
    else:
        model = _call_builder(builder, f"torchvision.models.{name}", kwargs, where)
    if weights_file is not None:
        load_weights_file(model, weights_file, label=str(weights), where=where)
    return model


def _weights_member(name: str, weights: str, base_dir: Any, where: _Where) -> Any:
    """The weights enum member ``weights`` names for model ``name``; a path-like string is a missing file."""
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(name)
    except (ValueError, KeyError):
        enum = None
    members = list(enum.__members__) if enum is not None else []
    if enum is not None and weights in enum.__members__:
        return enum[weights]
    if enum is not None and "." in weights and weights.split(".")[0].endswith("_Weights"):
        try:
            member = tvm.get_weight(weights)
        except (ValueError, KeyError, AttributeError):
            member = None
        if member is not None and type(member) is enum:
            return member
    if _ENUM_NAME.match(weights) and not Path(weights).suffix:
        allowed = f"{', '.join(members)} or" if members else "no pretrained weights exist; give"
        where.fail(
            "weights",
            f"unknown weights {show(weights)} for {name}{did_you_mean(weights, members)} "
            f"(allowed: {allowed} a path to a state_dict file)",
        )
    where.fail("weights", _missing_file(weights, base_dir))


def _call_pretrained(builder: Callable, name: str, member: Any, kwargs: dict, where: _Where) -> nn.Module:
    """Build with an enum member: torch.hub downloads (or reuses its cache); network failures explained."""
    try:
        return builder(weights=member, **kwargs)
    except (TypeError, ValueError) as err:
        raise where.error(
            "kwargs", f"{name}({_kwargs_text(kwargs)}) with weights {member}: {_one_line(err)}"
        ) from err
    except RuntimeError as err:
        if "hash" in str(err).lower():
            raise where.error(
                "weights",
                f"the downloaded file for {type(member).__name__}.{member.name} is corrupt "
                f"({_one_line(err)}); delete it from the torch hub cache (TORCH_HOME) and run again, "
                "or set weights: to a local file",
            ) from err
        raise
    except OSError as err:  # URLError, HTTPError, timeouts, connection resets, unwritable cache
        raise where.error(
            "weights",
            f"cannot download {type(member).__name__}.{member.name} from {member.url} ({_reason(err)}); "
            "without internet, fetch that file elsewhere and set weights: to its local path "
            "(e.g. weights: checkpoints/model.pth)",
        ) from err


def _call_builder(builder: Callable, label: str, kwargs: dict, where: _Where) -> nn.Module:
    try:
        return builder(**kwargs)
    except TypeError as err:
        raise where.error("kwargs", f"{label}({_kwargs_text(kwargs)}) failed: {_one_line(err)}") from err
    except ValueError as err:
        raise where.error("kwargs", f"{label}({_kwargs_text(kwargs)}) failed: {_one_line(err)}") from err


# -------------------------------------------------------------------------------------------- entrypoint
def _build_entrypoint(
    entry: str, weights: str | None, kwargs: dict, base_dir: Any, where: _Where
) -> nn.Module:
    target, _, fn_name = entry.rpartition(":")
    if not target or not fn_name.isidentifier():
        where.fail(
            "entrypoint", f"expected 'pkg.module:function' or 'path/to/file.py:function', got {show(entry)}"
        )
    weights_file = None
    if weights is not None:
        weights_file = resolve_path(weights, base_dir)
        if weights_file is None:
            if _ENUM_NAME.match(weights) and not Path(weights).suffix:
                where.fail(
                    "weights",
                    f"{show(weights)} looks like a torchvision weights name, which needs model.name; "
                    "with model.entrypoint give a path to a state_dict file",
                )
            where.fail("weights", _missing_file(weights, base_dir))
    dirs = [Path(base_dir)] if base_dir is not None else []
    dirs.append(Path.cwd())
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    if is_file:
        path = resolve_path(target, base_dir)
        if path is None or not path.is_file():
            where.fail("entrypoint", _missing_file(target, base_dir, what="file"))
        dirs.insert(0, path.resolve().parent)
    with _sys_path(dirs):
        module = _import_file(path, entry, where) if is_file else _import_module(target, entry, where)
        fn = getattr(module, fn_name, None)
        if fn is None:
            names = [n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n])]
            where.fail(
                "entrypoint",
                f"{show(entry)}: {target} has no {fn_name!r}{did_you_mean(fn_name, names)} "
                f"(callables there: {', '.join(sorted(names)[:10]) or 'none'})",
            )
        if not callable(fn):
            where.fail("entrypoint", f"{show(entry)}: {fn_name} is a {type(fn).__name__}, not a callable")
        try:
            model = fn(**kwargs)
        except TypeError as err:
            raise where.error(
                "kwargs", f"{fn_name}({_kwargs_text(kwargs)}) failed: {_one_line(err)}"
            ) from err
        except Exception as err:
            raise where.error(
                "entrypoint",
                f"{show(entry)}: calling {fn_name}({_kwargs_text(kwargs)}) failed: {_one_line(err)} "
                "(--debug shows the traceback)",
            ) from err
    if not isinstance(model, nn.Module):
        where.fail(
            "entrypoint", f"{show(entry)} returned a {type(model).__name__}, expected a torch.nn.Module"
        )
    if weights_file is not None:
        load_weights_file(model, weights_file, label=str(weights), where=where)
    return model


@contextlib.contextmanager
def _sys_path(dirs: list[Path]) -> Iterator[None]:
    """Put ``dirs`` at the front of sys.path while the user's module is imported and its builder runs."""
    added = []
    for d in reversed(dirs):
        s = str(d.resolve())
        if s not in sys.path:
            sys.path.insert(0, s)
            added.append(s)
    try:
        yield
    finally:
        for s in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(s)


def _import_file(path: Path, entry: str, where: _Where) -> Any:
    """Import a .py file as a module in sys.modules (so its classes pickle and dataclasses work)."""
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]  # stable across processes, unlike hash()
    mod_name = "lrpcli_user_" + re.sub(r"\W", "_", path.stem) + "_" + digest
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        where.fail("entrypoint", f"{show(entry)}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(mod_name, None)
        raise where.error(
            "entrypoint",
            f"{show(entry)}: importing {path.name} failed: {_one_line(err)} (--debug shows the traceback)",
        ) from err
    return module


def _import_module(target: str, entry: str, where: _Where) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        if err.name and (target == err.name or target.startswith(err.name + ".")):
            raise where.error(
                "entrypoint",
                f"{show(entry)}: no module named {err.name!r} (searched the config's folder, the current "
                "folder and sys.path; for a file write path/to/file.py:function)",
            ) from err
        raise where.error(
            "entrypoint", f"{show(entry)}: importing {target} failed: {_one_line(err)}"
        ) from err
    except Exception as err:
        raise where.error(
            "entrypoint",
            f"{show(entry)}: importing {target} failed: {_one_line(err)} (--debug shows the traceback)",
        ) from err


# ------------------------------------------------------------------------------------------ weights files
def load_weights_file(
    model: nn.Module, path: str | Path, *, label: str | None = None, where: _Where | None = None
) -> None:
    """Load a state_dict or checkpoint file into ``model`` (strict; 'module.' prefixes stripped)."""
    where = where or _Where("config")
    label = label or str(path)
    path = Path(path)
    if path.is_dir():
        where.fail("weights", f"{show(label)} is a directory, expected a state_dict file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            where.fail(
                "weights", f"{show(label)} is a .safetensors file; install the safetensors package to read it"
            )
        try:
            obj: Any = load_file(str(path))
        except Exception as err:
            raise where.error("weights", f"cannot read {show(label)}: {_one_line(err)}") from err
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise where.error(
                "weights",
                f"{show(label)} holds Python objects besides tensors, which are not loaded for safety; save "
                "just the weights: torch.save(model.state_dict(), 'weights.pt')",
            ) from err
        except Exception as err:
            raise where.error(
                "weights", f"cannot read {show(label)} as a torch file: {_one_line(err)}"
            ) from err
    state = extract_state_dict(obj)
    if state is None:
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else type(obj).__name__
        where.fail(
            "weights",
            f"{show(label)} holds no state_dict (found: {keys}); expected a state_dict or a dict with a "
            "'state_dict' or 'model' entry",
        )
    state = _fit_keys(state, model.state_dict())
    problems = _compare(state, model.state_dict())
    if problems:
        where.fail("weights", f"{show(label)} does not fit the model: {problems}")
    model.load_state_dict(state, strict=True)


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of a state_dict or a checkpoint dict (``state_dict``/``model``/...), else None."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    for key in ("state_dict", "model_state_dict", "model", "net", "network", "module"):
        if key in obj:
            inner = extract_state_dict(obj[key])
            if inner is not None:
                return inner
    return None


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _fit_keys(
    state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Strip DataParallel's 'module.'; strip another common first component only if that fits exactly."""
    if any(k.startswith("module.") for k in state):
        state = _strip(state, "module.")
    if set(state) == set(expected):
        return state
    firsts = {k.split(".", 1)[0] for k in state}
    if len(firsts) == 1 and all("." in k for k in state):
        stripped = _strip(state, firsts.pop() + ".")
        if set(stripped) == set(expected):
            return stripped
    return state


def _compare(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """'' when ``state`` fits ``expected``, else one line on missing, unexpected and misshaped keys."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshaped)):
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            parts.append(f"{len(keys)} {label} ({shown})")
    return "; ".join(parts)


# -------------------------------------------------------------------------------------------- helpers
def _missing_file(value: str, base_dir: Any, what: str = "file") -> str:
    """'file '...' not found (looked in ...)', with the path in full: a cut path cannot be checked."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return f"{what} {value!r} not found"
    places = [str(Path(base_dir).resolve())] if base_dir is not None else []
    cwd = str(Path.cwd())
    if cwd not in places:
        places.append(cwd)
    return f"{what} {value!r} not found (looked in {' and '.join(places)})"


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None)
    return _one_line(reason) if isinstance(reason, BaseException) else str(reason or _one_line(err))

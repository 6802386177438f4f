"""The config schema: one pydantic model per section, extra keys forbidden, defaults declared on the fields.

Each field's ``before`` validator is a check of ``lrpcli.spec.values``: it accepts YAML's looser spellings (``1e-6`` as
a string, one name for a list of one) and refuses anything else with lrpcli's one-line wording, which
``lrpcli.spec.config`` places at the file and the dotted key path. Names are checked against ``lrpcli.catalogue`` and
the composite's parameter fields come from its declarations, so validating a config imports no torch.
"""

import copy
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from lrpcli import catalogue
from lrpcli.spec.values import (
    Bad,
    at,
    boolean,
    choice,
    did_you_mean,
    each,
    expected,
    integer,
    is_number,
    known,
    listed,
    mapping,
    number,
    plain,
    show,
    string,
)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
GRAY_MEAN, GRAY_STD = [0.449], [0.226]  # mode L: the average of the ImageNet channel statistics
METHODS = ("lrp", "gradient", "input_x_gradient", "smoothgrad", "integrated_gradients", "occlusion")
BASELINES = ("zeros", "black", "white")
#: The largest ``run.seed``: torch generators take 64-bit seeds, and the seed is stored as a signed 64-bit int.
MAX_SEED = 2**63 - 1
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class EngineChecks(NamedTuple):
    """What only the engine can check, passed in by ``lrpcli.explainer.build`` so that the schema imports no torch: a
    torchvision model name, a module class name (each raising ``Bad``), and building a rule from its name and
    checked parameters (raising what the rule raises)."""

    model_name: Callable[[str], None] = lambda name: None
    module_type: Callable[[str], None] = lambda name: None
    rule: Callable[[str, dict, Mapping, Mapping], Any] = lambda name, params, comp, inp: None


NO_CHECKS = EngineChecks()


def check_keys(given: Mapping, allowed: tuple[str, ...]) -> None:
    """Unknown keys are errors (see ``unknown_key``)."""
    for key in given:
        if key not in allowed:
            raise Bad(unknown_key(key, allowed, "-"), f".{key}")


def unknown_key(key: Any, allowed: tuple[str, ...], here: str) -> str:
    """The message for an unknown key of section ``here``: a close key here, or the same key in another section."""
    hint = did_you_mean(key, allowed)
    if not hint:
        elsewhere = [f"{s}.{key}" for s, field in Spec.model_fields.items()
                     if s != here and key in getattr(field.annotation, "model_fields", ())]
        elsewhere = ["canonizers"] if key == "canonizers" and here else elsewhere
        hint = f"; did you mean {elsewhere[0]!r}?" if elsewhere else ""
    return f"unknown key{hint} (allowed: {', '.join(allowed)})"


def _v(check: Callable[..., Any], **kwargs: Any) -> BeforeValidator:
    """A field's check: ``check(value, **kwargs)`` before pydantic sees the value."""
    return BeforeValidator(lambda value: check(value, **kwargs))


def _auto_or(check: Callable[[Any], Any], what: str | None = None) -> BeforeValidator:
    """``auto`` (any case), else what ``check`` accepts; where ``what`` is given, a refusal names it instead."""
    def validate(value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return check(value)
        except Bad:
            if what is None:
                raise
            raise expected(what, value) from None

    return BeforeValidator(validate)


# ----------------------------------------------------------------------------------------- section values
def bounds(value: Any, n: int) -> Any:
    """``auto``, a number, or a list of ``n`` numbers (one per channel)."""
    what = f"auto, a number or a list of {n} numbers (one per channel)"
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise expected(what, value)
        return each(list(value), number)
    if not is_number(value):
        raise expected(what, value)
    return number(value)


def bounds_value(spec: Any, which: str, mean: list[float], std: list[float]) -> Any:
    """A bounds spec as a float or a list of floats per channel; ``auto`` from mean/std."""
    if spec == "auto":
        pixel = 0.0 if which == "low" else 1.0
        return [(pixel - m) / s for m, s in zip(mean, std)]
    return spec


def check_low_high(low: Any, high: Any, inp: Mapping) -> None:
    """``low`` below ``high`` (after ``auto`` is resolved), in every channel; the error is at ``.high``."""
    lo, hi = (bounds_value(v, w, list(inp["mean"]), list(inp["std"])) for v, w in ((low, "low"), (high, "high")))
    n = len(inp["mean"])
    for i, (a, b) in enumerate(zip(lo if isinstance(lo, list) else [lo] * n, hi if isinstance(hi, list) else [hi] * n)):
        if not a < b:
            where = "" if not isinstance(lo, list) and not isinstance(hi, list) else f" (channel {i})"
            raise Bad(f"expected a value above <at>low ({a:g}){where}, got {show(high)} ({b:g})", ".high")


def stabilizer(value: Any, default: Mapping | None = None) -> dict | None:
    default = default or catalogue.PARAMS["stabilizer"].default
    if is_number(value):
        value = {"epsilon": value}
    given = mapping(value)
    check_keys(given, ("epsilon", "mode"))
    return {"epsilon": at(".epsilon", number, given.get("epsilon", default["epsilon"]), minimum=0, strict=True),
            "mode": at(".mode", choice, given.get("mode", default["mode"]), catalogue.STABILIZER_MODES)}


def zero_params(value: Any) -> list[str]:
    items = listed(value, f"a list of parameter names from: {', '.join(catalogue.ZERO_PARAMS)}", one=True)
    return list(dict.fromkeys(each(items, lambda v: choice(v, catalogue.ZERO_PARAMS))))


def canonizer_list(value: Any) -> list[str]:
    out: list[str] = []
    for i, name in enumerate(listed(value, "a list of canonizer names", one=True)):
        at(f"[{i}]", known, "canonizer", name, catalogue.CANONIZER_NAMES)
        if name in out:
            raise Bad(f"canonizer {show(name)} is listed twice", f"[{i}]")
        out.append(name)
    return out


def rule_items(value: Any, comp: Mapping, inp: Mapping, checks: EngineChecks, offset: int = 0) -> list[dict]:
    """``composite.rules``: ``{match: glob, rule: R}`` or ``{type: Class, rule: R}`` items."""
    out = []
    for i, item in enumerate(listed(value, "a list of {match: glob, rule: ...} or {type: Class, rule: ...}")):
        out.append(at(f"[{i + offset}]", _rule_item, item, comp, inp, checks))
    return out


def _rule_item(item: Any, comp: Mapping, inp: Mapping, checks: EngineChecks) -> dict:
    if not isinstance(item, Mapping):
        raise expected("a mapping like {match: 'features.0', rule: zbox} or {type: Linear, rule: epsilon}", item)
    check_keys(item, ("match", "type", "rule"))
    if ("match" in item) == ("type" in item):
        raise Bad(f"needs exactly one of match (a module-name glob) or type (a module class), got {show(item)}")
    key = "match" if "match" in item else "type"
    entry = {key: at(f".{key}", string, item[key])}
    if key == "type":
        at(".type", checks.module_type, entry["type"])
    if "rule" not in item:
        raise Bad("missing; give a rule name (e.g. epsilon) or {name: epsilon, epsilon: 0.25}", ".rule")
    return {**entry, "rule": at(".rule", rule_spec, item["rule"], comp, inp, checks)}


def rule_spec(spec: Any, comp: Mapping, inp: Mapping, checks: EngineChecks) -> Any:
    """A rule name or ``{name: ..., **params}``, checked here and by building it (``checks.rule``)."""
    if isinstance(spec, str):
        name, params, name_at = spec, {}, ""
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise Bad(f"missing; a rule mapping needs a name, got {show(spec)}", ".name")
        name, params, name_at = spec["name"], {k: v for k, v in spec.items() if k != "name"}, ".name"
    else:
        raise expected("a rule name or a mapping {name: ..., param: value}", spec)
    name = at(name_at, string, name)
    for key in params:
        if not isinstance(key, str):
            raise Bad(f"parameter names must be strings, got {show(key)}", f".{key}")
    param_checks: dict[str, Callable[[Any], Any]] = {
        "epsilon": lambda v: number(v, minimum=0, strict=True), "gamma": lambda v: number(v, minimum=0),
        "alpha": lambda v: number(v, minimum=0), "beta": lambda v: number(v, minimum=0),
        "low": lambda v: bounds(v, len(inp["mean"])), "high": lambda v: bounds(v, len(inp["mean"])),
        "stabilizer": lambda v: stabilizer(v, comp["stabilizer"]), "zero_params": zero_params}
    checked = {k: at(f".{k}", param_checks.get(k, plain), v) for k, v in params.items()}
    if "low" in checked or "high" in checked:
        check_low_high(checked.get("low", comp["low"] or "auto"), checked.get("high", comp["high"] or "auto"), inp)
    key, names = catalogue.RULE_ALIASES.get(name.lower(), name.lower()), catalogue.RULE_NAMES
    if key not in names:
        raise Bad(f"unknown rule {show(name)}{did_you_mean(name.lower(), names)} (known: {', '.join(names)})", name_at)
    try:
        checks.rule(key, checked, comp, inp)
    except (ValueError, TypeError, KeyError) as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        for param in checked:
            if re.search(rf"(?<![\w]){re.escape(param)}(?![\w])", message):
                raise Bad(f"{message} (got {show(params[param])})", f".{param}") from None
        raise Bad(f"{message} (got {show(spec)})") from None
    return key if isinstance(spec, str) else {"name": key, **checked}


# ------------------------------------------------------------------------------------------------ sections
class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


OptStr = Annotated[str | None, _v(string, nullable=True)]
OptPositiveInt = Annotated[int | None, _v(integer, minimum=1, nullable=True)]
PositiveInt = Annotated[int, _v(integer, minimum=1)]


class ModelSpec(Section):
    name: OptStr = None
    entrypoint: OptStr = None
    weights: OptStr = None
    kwargs: Annotated[dict[str, Any], BeforeValidator(mapping)] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> "ModelSpec":
        if self.name is None and self.entrypoint is None:
            raise Bad("needs exactly one of model.name (a torchvision model) or model.entrypoint")
        if self.name is not None and self.entrypoint is not None:
            raise Bad(f"give model.name or model.entrypoint, not both (name is {show(self.name)})", ".entrypoint")
        if self.name is not None:
            at(".name", _checks(info).model_name, self.name)
        module_part, _, fn = (self.entrypoint or "m:f").rpartition(":")
        if not module_part or not fn.isidentifier():
            raise Bad(f"expected 'pkg.module:function' or 'path/to/file.py:function', got {show(self.entrypoint)}",
                      ".entrypoint")
        return self


def channels(mode: str) -> int:
    """Number of channels of an image mode (RGB: 3, L: 1)."""
    return 3 if mode == "RGB" else 1


#: The default mean and std of each ``input.mode``.
_STATS = {"RGB": (IMAGENET_MEAN, IMAGENET_STD), "L": (GRAY_MEAN, GRAY_STD)}


class InputSpec(Section):
    resize: OptPositiveInt = 256
    crop: OptPositiveInt = 224
    mean: list[float] = Field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = Field(default_factory=lambda: list(IMAGENET_STD))
    mode: Literal["RGB", "L"] = "RGB"

    @model_validator(mode="before")
    @classmethod
    def _per_channel(cls, raw: Any) -> Any:
        """mean/std have one number per channel of ``mode``; their defaults follow it."""
        if not isinstance(raw, Mapping):
            return raw
        mode = at(".mode", choice, raw.get("mode", "RGB"), tuple(_STATS))
        n, out = channels(mode), {**raw, "mode": mode}
        what = f"a list of {n} numbers (one per {mode} channel)"
        for key, default in zip(("mean", "std"), _STATS[mode]):
            value = raw.get(key, default)
            items = at(f".{key}", listed, [value] * n if is_number(value) and not isinstance(value, str) else value,
                       what, False)
            if len(items) != n:
                raise expected(what, value, f".{key}")
            out[key] = at(f".{key}", each, items, lambda v, k=key: number(v, minimum=0 if k == "std" else None,
                                                                            strict=k == "std"))
        return out

    @model_validator(mode="after")
    def _crop_fits(self) -> "InputSpec":
        if self.resize is not None and self.crop is not None and self.crop > self.resize:
            raise Bad(f"expected an integer <= input.resize ({self.resize}), got {self.crop}", ".crop")
        return self


#: The checks a composite parameter's ``kind`` names (``lrpcli.catalogue.Param``); bounds need the input's
#: channels, so ``Spec`` checks them.
PARAM_CHECKS: dict[str, Callable[[Any], Any]] = {
    "positive": lambda v: number(v, minimum=0, strict=True), "non_negative": lambda v: number(v, minimum=0),
    "bounds": lambda v: v, "zero_params": zero_params, "stabilizer": stabilizer,
    "maxpool": lambda v: choice(v, catalogue.MAXPOOL_MODES)}


def _param_field(param: catalogue.Param) -> tuple[Any, Any]:
    """A composite parameter as a field: its declared check and default; null for a composite not using it."""
    check = PARAM_CHECKS[param.kind]
    return (Annotated[Any, BeforeValidator(lambda v: None if v is None else check(v))],
            Field(default_factory=param.config_default, description=param.description))


def _composite_name(value: Any) -> str:
    return known("composite", value, sorted(catalogue.COMPOSITES))


class _Composite(Section):
    """The composite section; its parameter fields come from ``lrpcli.catalogue.PARAMS`` (``CompositeSpec``).
    ``low``/``high``, their order and ``rules`` need the input's channels: ``Spec`` checks them."""

    @model_validator(mode="before")
    @classmethod
    def _used_params(cls, raw: Any) -> Any:
        """A parameter the composite does not use is an error when given, null when not. The composite's own
        defaults (``CompositeDecl.defaults``) fill what is not given; a mapping default sits under a given mapping
        (or a number, its epsilon), so the keys not given keep the composite's values."""
        if not isinstance(raw, Mapping):
            return raw
        name = at(".name", _composite_name, raw.get("name", "epsilon_gamma_box"))
        used = catalogue.COMPOSITES[name].params
        for key in catalogue.PARAMS:
            if key not in used and raw.get(key) is not None:
                raise Bad(f"composite {name!r} does not use {key} (got {show(raw[key])}); remove it (its parameters: "
                          f"{', '.join(p for p in catalogue.PARAMS if p in used) or 'none'})", f".{key}")
        keep = {k: v for k, v in raw.items() if v is not None or k not in (*used, "rules", "strict")}
        for key, default in catalogue.COMPOSITES[name].defaults.items():
            given = {"epsilon": keep[key]} if is_number(keep.get(key)) else keep.get(key)
            if given is None or isinstance(default, Mapping) and isinstance(given, Mapping):
                keep[key] = copy.deepcopy(default) if given is None else {**default, **given}
        return {**keep, **{k: None for k in catalogue.PARAMS if k not in used}}


def _composite_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {"name": (Annotated[str, BeforeValidator(_composite_name)], "epsilon_gamma_box")}
    for name, param in catalogue.PARAMS.items():
        fields[name] = _param_field(param)
        if name == "stabilizer":  # the output order of earlier versions: rules after stabilizer
            fields["rules"] = (Any, Field(default_factory=list))
    return {**fields, "strict": (Annotated[bool, BeforeValidator(boolean)], False)}


CompositeSpec = create_model("CompositeSpec", __base__=_Composite, **_composite_fields())


def _target(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("label", "prediction"):
        return value.strip().lower()
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise expected("label, prediction or a class index >= 0", value)


def _baseline(value: Any) -> Any:
    if is_number(value):
        return number(value)
    if isinstance(value, str) and value.strip().lower() in BASELINES:
        return value.strip().lower()
    raise expected(f"one of {', '.join(BASELINES)} or a number", value)


def _pair(value: Any) -> list[int]:
    what = "an integer >= 1 or a list of 2 (height, width)"
    items = listed([value, value] if isinstance(value, int) and not isinstance(value, bool) else value, what, False)
    if len(items) != 2:
        raise expected(what, value)
    return each(items, lambda v: integer(v, minimum=1))


Pair = Annotated[list[int], BeforeValidator(_pair)]


class AttributionSpec(Section):
    method: Annotated[str, _v(choice, choices=METHODS)] = "lrp"
    target: Annotated[int | str, BeforeValidator(_target)] = "label"
    noise_level: Annotated[float, _v(number, minimum=0)] = 0.1
    n_iter: PositiveInt = 20
    baseline: Annotated[float | str, BeforeValidator(_baseline)] = "zeros"
    window: Pair = Field(default_factory=lambda: [8, 8])
    stride: Pair = Field(default_factory=lambda: [8, 8])
    fill: Annotated[float, _v(number)] = 0.0


def _device(value: Any) -> str:
    if not isinstance(value, str) or not _DEVICE_RE.match(value.strip().lower()):
        raise expected("auto, cpu, cuda or cuda:N", value)
    return value.strip().lower()


class RunSpec(Section):
    """``threads``: torch's intra-op threads for the run; auto keeps torch's own default."""

    batch_size: Annotated[int, _v(integer, minimum=1, maximum=catalogue.MAX_BATCH_SIZE,
                                  above=f"an integer from 1 to {catalogue.MAX_BATCH_SIZE}")] = 16
    num_workers: Annotated[int | Literal["auto"], _auto_or(lambda v: integer(v, minimum=0),
                                                           "auto or an integer >= 0")] = "auto"
    device: Annotated[str, BeforeValidator(_device)] = "auto"
    max_samples: OptPositiveInt = None
    seed: Annotated[int, _v(integer, minimum=0, maximum=MAX_SEED)] = 0
    threads: Annotated[int | Literal["auto"], _auto_or(lambda v: integer(
        v, minimum=1, maximum=1024, above="auto or an integer from 1 to 1024"))] = "auto"


class OutputSpec(Section):
    path: Annotated[str, BeforeValidator(string)] = "out.h5"
    dtype: Annotated[Literal["float32", "float16"], _v(choice, choices=("float32", "float16"))] = "float32"
    store_input: Annotated[bool, BeforeValidator(boolean)] = True
    layers: Annotated[list[str], BeforeValidator(lambda v: each(listed(
        v, "a list of module-name globs (e.g. layer4, features.*)", one=True), string))] = Field(default_factory=list)
    compression: Annotated[str, _v(choice, choices=catalogue.COMPRESSIONS)] = "auto"


def _model_section(value: Any) -> Any:
    if value is None:
        raise Bad("missing; set model.name (a torchvision model) or model.entrypoint (pkg.module:fn)")
    return mapping(value)


class Spec(Section):
    """A whole config; sections in output order."""

    model: Annotated[ModelSpec, BeforeValidator(_model_section)] = Field(None, validate_default=True)
    input: Annotated[InputSpec, BeforeValidator(mapping)] = Field(None, validate_default=True)
    canonizers: Annotated[list[str], BeforeValidator(canonizer_list)] = Field(default_factory=list)
    composite: Annotated[CompositeSpec, BeforeValidator(mapping)] = Field(None, validate_default=True)
    attribution: Annotated[AttributionSpec, BeforeValidator(mapping)] = Field(None, validate_default=True)
    run: Annotated[RunSpec, BeforeValidator(mapping)] = Field(None, validate_default=True)
    output: Annotated[OutputSpec, BeforeValidator(mapping)] = Field(None, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _canonizers_in_composite(cls, raw: Any) -> Any:
        """``composite.canonizers`` is the top-level list written inside the composite."""
        comp = raw.get("composite") if isinstance(raw, Mapping) else None
        if not isinstance(comp, Mapping) or "canonizers" not in comp:
            return raw
        if "canonizers" in raw:
            raise Bad("canonizers are given twice; keep the top-level canonizers list only", "composite.canonizers")
        value = at("composite.canonizers", canonizer_list, comp["canonizers"])
        return {**raw, "canonizers": value, "composite": {k: v for k, v in comp.items() if k != "canonizers"}}

    @field_validator("composite", mode="after")
    @classmethod
    def _composite_needs_input(cls, comp: CompositeSpec, info: ValidationInfo) -> CompositeSpec:
        inp = info.data.get("input")
        if inp is None:
            return comp
        inp_d, comp_d = inp.model_dump(), comp.model_dump()
        update = {k: at(f".{k}", bounds, comp_d[k], len(inp.mean)) for k in ("low", "high") if comp_d[k] is not None}
        if update:
            check_low_high(update["low"], update["high"], inp_d)
        comp_d.update(update)
        rules = at(".rules", rule_items, comp.rules, comp_d, inp_d, _checks(info))
        return comp.model_copy(update={**update, "rules": rules})


def _checks(info: ValidationInfo) -> EngineChecks:
    return (info.context or {}).get("checks", NO_CHECKS)

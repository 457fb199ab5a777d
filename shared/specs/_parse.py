"""Spec text and objects -> validated parts (:class:`NormSpec`).

Text is read as a Python literal (the paper's launch scripts write ``False``), then JSON, then YAML.
Objects are short strings, mappings or lists of those. Every name is looked up in the part tables
(:mod:`shared.specs._table`) and every keyword checked against the target constructor's signature,
so a typo fails here, with close matches, instead of being dropped.
"""
from __future__ import annotations

import ast
import inspect
import json
import re
from typing import Any, Mapping, Optional, Sequence

import yaml

from shared.specs._table import (
    CHANNELS_FIRST, KIND_ALIASES, KINDS, LAYOUTS, PART_TYPES, PRESETS, SITE_ARGS, SITES, TABLE,
    TIMM_NORM_HINTS, NormSpec, OnlyValue, PartSpec, PartType, SpecError, accepted_arguments,
    preset_parts, row_of, suggest, target_name, timm_row,
)

# ----------------------------------------------------------------------------------------------
# Text -> objects
# ----------------------------------------------------------------------------------------------

_SHORT = re.compile(r"^(?P<name>[a-z][a-z_]*?)(?P<number>\d+)?(?:-(?P<variant>[a-z]+))?$")
_VARIANTS = {"shift": (True, False), "scale": (False, True)}  # shift-only / scale-only noise


class _YamlLoader(yaml.SafeLoader):
    """A SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def _caret(text: str, line: int, column: int) -> str:
    """The offending line of ``text`` with a caret under ``column`` (both 0-based)."""
    lines = text.splitlines() or [text]
    line = min(max(line, 0), len(lines) - 1)
    return f"\n  {lines[line]}\n  {' ' * max(column, 0)}^"


def _load_text(text: str) -> Any:
    """Parse structured spec text: Python literal (the launch scripts' ``False``), JSON, then YAML.

    Text with double quotes that is neither a Python literal nor JSON is still read as YAML (flow YAML
    may quote some keys), unless YAML fails or its result contains a string with a double quote: YAML
    reads some malformed JSON as strange strings (``{"a":1 "b":2}`` -> ``{'a': '1 "b":2'}``), and then
    JSON's error message, with its position, is the useful one.
    """
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    json_error = None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if '"' in text:
            json_error = SpecError(f"malformed spec {text!r}: JSON error at line {err.lineno}, column {err.colno}: "
                                   f"{err.msg}" + _caret(text, err.lineno - 1, err.colno - 1))
    try:
        loaded = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        if json_error is not None:
            raise json_error from None
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        caret = _caret(text, mark.line, mark.column) if mark else ""
        raise SpecError(f"malformed spec {text!r}: YAML error{where}: {problem}{caret}") from None
    # a '"' inside a YAML scalar (a key or a value, at any depth) is JSON that YAML misread
    if json_error is not None and any('"' in token.value for token in yaml.scan(text)
                                      if isinstance(token, yaml.ScalarToken)):
        raise json_error
    return loaded


def _lookup(name: str, kind: Optional[str], site: str, where: str, required: bool = True) -> Optional[PartType]:
    """The table row for a (possibly aliased) name; an unknown name is a SpecError with the close matches
    (None if not ``required``).

    With ``kind`` None the tables the site accepts are searched; a name found in several of them
    (``standard`` is a gain, a bias, a conv...) needs an explicit ``type``. Then timm's norm and
    activation names.
    """
    kinds = (kind,) if kind else SITES[site]
    rows = [TABLE[k][name] for k in kinds if name in TABLE[k]]
    if len(rows) > 1:
        raise SpecError(f"{where}: {name!r} is ambiguous without a type: it names a "
                        f"{' / '.join(r.kind for r in rows)} part; add e.g. \"type\": \"{rows[0].kind}\"")
    if not rows:
        timm_rows = (timm_row(k, name) for k in ("norm", "activation") if k in kinds)
        rows = [row for row in timm_rows if row is not None]
    if rows or not required:
        return rows[0] if rows else None
    known = [n for k in kinds for n in TABLE[k]]
    canonical = [row.name for row in PART_TYPES if row.kind in kinds]
    if "norm" in kinds:
        known += list(PRESETS) + list(TIMM_NORM_HINTS)
        canonical += [f"{p}N" for p in PRESETS] + ["timm norm names"]
    table = f"'{kind}' part" if kind else f"part at a {site} site"
    raise SpecError(f"{where}: unknown {table} {name!r}{suggest(name, known)}; valid: {', '.join(canonical)}")


def _make_part(row: PartType, given: Mapping[str, Any], where: str, site: str) -> PartSpec:
    """The part of ``row`` with the keywords ``given``: the reference's keywords renamed, each
    checked against the target's signature, the target's required keywords present."""
    accepted, varkw = accepted_arguments(row)
    kwargs: dict = {}
    for key, value in given.items():
        if not isinstance(key, str):
            raise SpecError(f"{where}: keyword names must be strings, got {key!r}")
        if key in SITE_ARGS:
            raise SpecError(f"{where}: {key!r} is supplied by the {site} site, not by the spec")
        target_key, alias = key, row.keyword_aliases.get(key)
        if isinstance(alias, OnlyValue):
            if value != alias.value:
                raise SpecError(alias.message.format(given=value))
            continue
        if isinstance(alias, tuple):  # (our name, converter of the value)
            target_key, convert = alias
            value = convert(value)
        elif isinstance(alias, str):
            target_key = alias
        if target_key not in accepted and not varkw:
            names = list(accepted) + list(row.keyword_aliases)
            raise SpecError(f"{where}: unknown keyword {key!r} for '{row.name}' ({target_name(row)})"
                            f"{suggest(key, names)}; valid: {', '.join(sorted(accepted)) or 'none'}")
        if target_key in kwargs:
            raise SpecError(f"{where}: {target_key!r} given twice (as {key!r} and under another name)")
        kwargs[target_key] = value
    if row.kind not in ("conv", "linear"):  # conv / linear get their shapes from the call site
        missing = [n for n, default in accepted.items() if default is inspect.Parameter.empty and n not in kwargs]
        if missing:
            hint = f", e.g. '{row.name}16'" if row.number_arg in missing else ""
            raise SpecError(f"{where}: '{row.name}' needs {', '.join(repr(m) for m in missing)}{hint}")
    return PartSpec(row.kind, row.name, tuple(sorted(kwargs.items())))


def _parse_short(token: str, site: str, where: str) -> list:
    """``gbn16`` / ``gni16-shift`` / ``ln`` / a timm norm name -> parts."""
    text = token.strip().lower()
    # whole names first: 'bn2d' or timm's 'layernormfp32' end in digits that are not a number argument
    row = _lookup(text, None, site, where, required=False) if text not in PRESETS else None
    match = _SHORT.match(text)
    if row is not None or match is None:  # a whole name, or no short string: _lookup raises with close matches
        return [_make_part(row or _lookup(text, None, site, where), {}, where, site)]
    name, number, variant = match["name"], match["number"], match["variant"]
    if variant is not None and variant not in _VARIANTS:
        raise SpecError(f"{where}: unknown variant '-{variant}' in {token!r}{suggest(variant, _VARIANTS)}; "
                        f"valid: -shift (shift noise only), -scale (scale noise only)")
    shift, scale = _VARIANTS.get(variant, (True, True))
    number = int(number) if number is not None else None
    if name in PRESETS:
        return preset_parts(name, number, shift, scale)
    row = _lookup(name, None, site, where)
    given: dict = {}
    if number is not None:
        if row.number_arg is None:
            raise SpecError(f"{where}: '{row.name}' takes no number, got {token!r}")
        given[row.number_arg] = number
    if variant is not None:
        if not row.has_shift_scale:
            raise SpecError(f"{where}: '{row.name}' has no shift/scale noise to select with '-{variant}'")
        given.update(shift=shift, scale=scale)
    return [_make_part(row, given, where, site)]


def _parse_mapping(mapping: Mapping, site: str, where: str) -> list:
    """``{type?, subtype, dkwargs?, okwargs?, **flat_kwargs}`` -> a list of one part."""
    flat = dict(mapping)
    kind = flat.pop("type", None)
    subtype = flat.pop("subtype", None)
    if subtype is None:
        raise SpecError(f"{where}: a mapping part needs a 'subtype' key, got keys {sorted(map(str, mapping))}")
    for key, value in (("subtype", subtype), ("type", kind)):
        if value is not None and not isinstance(value, str):
            raise SpecError(f"{where}: {key} must be a string, got {value!r}")
    if kind is not None:
        kind = KIND_ALIASES.get(kind, kind)
        if kind not in KINDS:
            raise SpecError(f"{where}: unknown part type {kind!r}{suggest(kind, KINDS)}; valid: {', '.join(KINDS)}")
        if kind not in SITES[site]:
            raise SpecError(f"{where}: a '{kind}' part cannot be used at a {site} site "
                            f"(valid part types there: {', '.join(SITES[site])})")
    groups = {group: flat.pop(group, None) or {} for group in ("dkwargs", "okwargs")}
    given: dict = {}
    for group, keywords in {**groups, "flat keywords": flat}.items():
        if not isinstance(keywords, Mapping):
            raise SpecError(f"{where}: {group} must be a mapping, got {keywords!r}")
        for key, value in keywords.items():
            if key in given:
                raise SpecError(f"{where}: keyword {key!r} given twice")
            given[key] = value
    subtype = subtype.strip().lower()
    try:
        row = _lookup(subtype, kind, site, where)
    except SpecError:
        if subtype == "gni":  # a preset name (and the reference's older shuffle variant), not a single part
            raise SpecError(f"{where}: 'gni' is a short-string preset ('gni16' = bn2d(affine=False), gnir16, gain, "
                            f"bias), not a part; in a mapping use subtype 'gnir' for the noise alone "
                            f"(with sampling='shuffle' for the reference's older 'gni' variant)") from None
        raise
    return [_make_part(row, given, where, site)]


def _parse_object(spec: Any, site: str, text: Optional[str] = None) -> list:
    where = f"spec {text if text is not None else spec!r}"
    if isinstance(spec, str):
        stripped = spec.strip()
        if not stripped:
            raise SpecError("empty spec string")
        if stripped[0] in "[{" or ":" in stripped or "\n" in stripped:
            return _parse_object(_load_text(stripped), site, text=stripped)
        return _parse_short(stripped, site, where)
    if isinstance(spec, Mapping):
        return _parse_mapping(spec, site, where)
    if isinstance(spec, Sequence):
        if not spec:
            raise SpecError(f"{where}: empty list (use 'none' for no layer)")
        parts: list = []
        for index, item in enumerate(spec):
            if not isinstance(item, (str, Mapping)):
                raise SpecError(f"{where}, item {index}: list items must be strings or mappings, "
                                f"got {item!r}")
            parse_item = _parse_short if isinstance(item, str) else _parse_mapping
            parts += parse_item(item, site, f"{where}, item {index}")
        return parts
    raise SpecError(f"a spec must be a string, mapping or list, got {type(spec).__name__}: {spec!r}")


def parse_spec(spec: Any, site: str = "norm", layout: str = CHANNELS_FIRST) -> NormSpec:
    """Parse and validate ``spec`` for a ``site`` ('norm', 'noise', 'conv' or 'linear') of ``layout``.

    Raises:
        SpecError: malformed text, unknown names or keywords, a part that does not fit the site or layout.
    """
    if site not in SITES:
        raise ValueError(f"site must be one of {', '.join(SITES)}, got {site!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'channels_first' or 'channels_last', got {layout!r}")
    parts = _parse_object(spec, site)
    for part in parts:
        if part.kind not in SITES[site]:
            raise SpecError(f"spec {spec!r}: a '{part.kind}' part ({part}) cannot be used at a {site} site")
        if layout not in row_of(part).layouts:
            raise SpecError(f"spec {spec!r}: '{part.subtype}' needs channels_first (N, C, H, W) input, but this "
                            f"site is channels_last (N, ..., C); use e.g. 'ln' there")
    return NormSpec(tuple(parts), layout)


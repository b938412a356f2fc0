"""Load a YAML config file into a validated ``BotConfig``; every error names file, key and line.

The YAML is composed once into nodes, which give the line of every key, and then constructed
with safe_load semantics. Pydantic errors are rewritten into short messages and located at the
closest key that exists in the file; when there are several, the first in file order is raised
and the others are counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel, ValidationError

from tbot_py.config._checks import (
    CONFIG_ERROR_TYPE,
    Loc,
    describe_type,
    format_yaml_path,
    read_text_file,
)
from tbot_py.config.schema import BotConfig
from tbot_py.errors import ConfigError

if TYPE_CHECKING:
    import yaml

__all__ = [
    "config_error_from_validation",
    "load_config_file",
    "load_config_text",
    "validate_config_data",
]


def load_config_file(path: str | Path) -> BotConfig:
    """Read and validate a v2 config file. Raises ConfigError."""
    source = str(path)
    text, problem = read_text_file(path)
    if text is None:
        raise ConfigError(f"config file {source} {problem}")
    return load_config_text(text, source=source)


def load_config_text(text: str, source: str = "<config>") -> BotConfig:
    """Validate config YAML given as text; ``source`` names it in errors. Raises ConfigError."""
    data, lines = _parse_yaml(text, source)
    config = validate_config_data(data, source=source, lines=lines)
    config._warnings = [
        dataclasses.replace(w, source=source, line=_line_for(w.loc, lines))
        for w in config._warnings
    ]
    return config


def validate_config_data(
    data: Any,
    *,
    source: str | None = None,
    lines: Mapping[Loc, int] | None = None,
    flags: Mapping[Loc, str] | None = None,
) -> BotConfig:
    """Validate plain data into a BotConfig, or raise one located ConfigError.

    The ConfigError is raised outside the ``except`` block so that pydantic's error, which
    holds the input values (and so possibly a token), is not attached as its context.
    """
    try:
        return BotConfig.model_validate(data)
    except ValidationError as exc:
        failure = config_error_from_validation(exc, data, source=source, lines=lines, flags=flags)
    raise failure


def config_error_from_validation(
    exc: ValidationError,
    data: Any,
    *,
    source: str | None = None,
    lines: Mapping[Loc, int] | None = None,
    flags: Mapping[Loc, str] | None = None,
) -> ConfigError:
    """One ConfigError for the first problem in file order, counting the others.

    ``data`` is the plain input that was validated. ``lines`` maps key paths to 1-based lines.
    ``flags`` maps key paths set from the command line to the flag that set them, so errors
    about those keys name the flag instead of a file location.
    """
    lines = lines or {}
    problems: list[_Problem] = []
    for error in exc.errors():
        loc = _clean_loc(error["loc"], data)
        if error["type"] == CONFIG_ERROR_TYPE:
            problems += [_Problem((*loc, *rel), msg) for rel, msg in error["ctx"]["problems"]]
        else:
            problems.append(_describe(error, loc, data))
    # A misspelt key also shows up as a missing one; the "did you mean" error says it all.
    suggested = {(p.loc, p.suggestion) for p in problems if p.suggestion}
    problems = [p for p in problems if not (p.missing and (p.loc, p.missing) in suggested)]
    found: list[tuple[float, int, ConfigError]] = []
    for problem in problems:
        flag = _flag_for(problem.loc, flags or {})
        line = None if flag else _line_for(problem.line_loc or problem.loc, lines)
        yaml_path = flag or format_yaml_path(problem.loc) or None
        config_error = ConfigError(
            problem.message, source=None if flag else source, line=line, yaml_path=yaml_path
        )
        found.append((line if line is not None else float("inf"), len(found), config_error))
    found.sort(key=lambda item: item[:2])
    first = found[0][2]
    if len(found) > 1:
        more = len(found) - 1
        first.message += f" (and {more} more error{'s' if more > 1 else ''})"
    return first


@dataclasses.dataclass(frozen=True)
class _Problem:
    loc: Loc  # where the YAML path points
    message: str
    line_loc: Loc | None = None  # where the line comes from, if not ``loc``
    missing: str | None = None  # the key a "missing required key" error is about
    suggestion: str | None = None  # the key an "unknown key" error suggests


# --- YAML ------------------------------------------------------------------------------------


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int]]:
    import yaml  # here, not at the top: a run configured by flags alone never loads PyYAML

    # Errors are raised outside the except blocks: a YAML error quotes the offending text,
    # which may hold a token, and must not ride along as __context__.
    loader = yaml.SafeLoader(text)
    failure: ConfigError | None = None
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(
                'the config file is empty; it needs at least "version: v2"', source=source
            )
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.MappingNode):
            kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
            message = f"expected a mapping of config keys at the top level, got {kind}"
            raise ConfigError(message, source=source, line=line)
        lines: dict[Loc, int] = {(): line}
        _record_lines(node, (), lines, source, set())
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        failure = _yaml_error(exc, source)
    except yaml.YAMLError as exc:
        failure = ConfigError(f"invalid YAML: {type(exc).__name__}", source=source)
    finally:
        loader.dispose()
    if failure is not None:
        raise failure
    return data, lines


def _yaml_error(exc: yaml.MarkedYAMLError, source: str) -> ConfigError:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "malformed YAML"
    if "'\\t'" in problem:
        problem += " (YAML does not allow tabs for indentation)"
    elif "<block" in problem:
        problem += " (check the indentation)"
    elif (exc.context or "").startswith("while scanning a simple key"):
        # The scanner notices the missing ':' on the next line; the culprit is the key.
        mark = exc.context_mark or mark
        problem += " after a key"
    line = mark.line + 1 if mark else None
    return ConfigError(f"invalid YAML: {problem}", source=source, line=line)


def _record_lines(
    node: yaml.Node, path: Loc, lines: dict[Loc, int], source: str, active: set[int]
) -> None:
    """Record the line of every key and list item below ``node``; reject duplicate keys."""
    import yaml

    if id(node) in active:  # a recursive alias; pydantic reports it
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.tag != "tag:yaml.org,2002:str" or not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(
                    _non_string_key(key_node),
                    source=source,
                    line=line,
                    yaml_path=format_yaml_path(path) or None,
                )
            key = key_node.value
            if key in seen:
                raise ConfigError(
                    f'duplicate key "{key}"',
                    source=source,
                    line=line,
                    yaml_path=format_yaml_path(path) or None,
                )
            seen.add(key)
            lines[(*path, key)] = line
            _record_lines(value_node, (*path, key), lines, source, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _record_lines(item, (*path, index), lines, source, active)
    active.discard(id(node))


def _non_string_key(node: yaml.Node) -> str:
    import yaml

    if not isinstance(node, yaml.ScalarNode):
        return "keys must be plain strings"
    kind = _TAG_NAMES.get(node.tag.rsplit(":", 1)[-1], "a non-string value")
    return f'key "{node.value}" is read as {kind}, not a string; quote it'


_TAG_NAMES = {
    "bool": "a boolean",
    "int": "an integer",
    "float": "a number",
    "null": "an empty value",
    "timestamp": "a date",
}


def _line_for(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _flag_for(loc: Loc, flags: Mapping[Loc, str]) -> str | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in flags:
            return flags[loc[:end]]
    return None


# --- pydantic errors -------------------------------------------------------------------------


def _clean_loc(loc: tuple[int | str, ...], data: Any) -> Loc:
    """Drop the union tags pydantic inserts (the ``identity`` in services.0.identity.name)."""
    cleaned: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and node.get("type") == part:
            continue
        cleaned.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(cleaned)


_TYPE_NAMES = {
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "int_type": "an integer",
    "float_type": "a number",
}


def _describe(error: Any, loc: Loc, data: Any) -> _Problem:
    """Rewrite one pydantic error into a short message, never showing a value that may be secret."""
    kind = error["type"]
    if kind == "missing":
        key = str(loc[-1])
        return _Problem(loc[:-1], f'missing required key "{key}"', missing=key)
    if kind == "extra_forbidden":
        import difflib

        key = str(loc[-1])
        close = difflib.get_close_matches(key, _known_keys(loc[:-1], data), n=1, cutoff=0.6)
        if not close:
            return _Problem(loc[:-1], f'unknown key "{key}"', line_loc=loc)
        message = f'unknown key "{key}"; did you mean "{close[0]}"?'
        return _Problem(loc[:-1], message, line_loc=loc, suggestion=close[0])
    return _Problem(loc, _describe_value_error(error))


def _describe_value_error(error: Any) -> str:
    kind = error["type"]
    value = error.get("input")
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}, got {describe_type(value)}"
    if kind == "literal_error":
        # Literal fields hold choices such as "on"/"off", never secrets.
        expected = str(error.get("ctx", {}).get("expected", "")).replace("'", '"')
        got = f'"{value}"' if isinstance(value, str) else describe_type(value)
        return f"expected {expected}, got {got}"
    if kind == "recursion_loop":
        return "a YAML alias refers to itself"
    message = str(error["msg"])
    return message[:1].lower() + message[1:]


def _known_keys(parent: Loc, data: Any) -> list[str]:
    """The keys the model at ``parent`` accepts, for "did you mean" suggestions."""
    # The model is picked where its mapping is: a union in a list (services) by the item's type.
    annotation: Any = BotConfig
    node = data
    for part in parent:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            continue
        model = _model_for(annotation, node)
        field = model.model_fields.get(part) if model else None
        if field is None:
            return []
        node = node.get(part) if isinstance(node, dict) else None
        annotation = field.annotation
    model = _model_for(annotation, node)
    return list(model.model_fields) if model else []


def _model_for(annotation: Any, node: Any) -> type[BaseModel] | None:
    candidates = _models_in(annotation)
    if len(candidates) == 1:
        return candidates[0]
    kind = node.get("type") if isinstance(node, dict) else None
    for candidate in candidates:
        field = candidate.model_fields.get("type")
        if field is not None and field.default == kind:
            return candidate
    return None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]

"""Bounds on the work one manifest can cause, and the YAML loader that enforces them.

Whatever a file holds, reading and checking it takes bounded time and memory:

- a manifest file is at most MAX_MANIFEST_BYTES (1 MiB; etcd refuses requests over
  ~1.5 MiB, so nothing larger could be a stored object) and UTF-8 text;
- YAML nests at most MAX_YAML_DEPTH levels, uses at most MAX_YAML_ALIASES aliases, and
  a document expands (aliases followed) to at most MAX_YAML_NODES nodes, so an alias bomb
  ("billion laughs") fails while it is parsed, not while something walks it later;
- mapping keys are strings and unique (as `kubectl apply` with strict field validation
  requires); YAML's timestamp, binary, set and ordered-map types are refused or kept as
  strings (JSON has none of them);
- a spec (however it arrived: file, API server, test) nests at most MAX_SPEC_DEPTH levels,
  holds at most MAX_SPEC_NODES values, only finite numbers and int64 integers (what the API
  server and every JSON client can represent), and each free-form model config
  (`model.*.config`) nests at most MAX_CONFIG_DEPTH levels and is at most
  MAX_CONFIG_BYTES as compact JSON.

The API server's own limits are looser: it accepts request bodies up to 3 MiB, JSON
nested up to 10,000 levels (Go's decoder), and stores objects up to etcd's ~1.5 MiB; the
CRD cannot bound the depth of a preserve-unknown-fields subtree, so the depth and size
caps of model configs are enforced here (`vlmpretrain validate` and the operator, which
marks such a run Invalid).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

MAX_MANIFEST_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_ALIASES = 1000
MAX_YAML_NODES = 100_000
MAX_DOCUMENTS = 64
MAX_SPEC_DEPTH = 40
MAX_SPEC_NODES = 100_000
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_BYTES = 64 * 1024
MAX_CONFIG_KEYS = 512  # top-level keys (the CRD's maxProperties)
INT64 = (-(2**63), 2**63 - 1)
CONFIG_PARTS = ("llm", "visionEncoder")  # spec.model.<part>.config is free-form


class LimitError(yaml.MarkedYAMLError):
    """A YAML document past one of the limits (a YAMLError: reported like bad YAML)."""


# ---------------------------------------------------------------------------- files


def read_manifest(path: str, stdin: Any = None) -> str:
    """The text of a manifest file ('-': stdin), at most MAX_MANIFEST_BYTES of UTF-8.
    Raises ValueError with a short reason (OSError for a file that cannot be read)."""
    if path == "-":
        import sys

        data = (stdin or sys.stdin.buffer).read(MAX_MANIFEST_BYTES + 1)
    else:
        with Path(path).open("rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes (1 MiB), more than any stored object can be")
    if b"\x00" in data:
        raise ValueError("a binary file (it holds NUL bytes), not a YAML manifest")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (invalid byte at offset {exc.start})") from None


# ---------------------------------------------------------------------------- YAML


class _Composer(yaml.composer.Composer):
    """PyYAML's composer, counting depth, aliases and the expanded size as it goes."""

    def compose_document(self):
        self._depth, self._aliases, self._count, self._weights = 0, 0, 0, {}
        try:
            return super().compose_document()
        finally:
            self._weights = {}

    def _grow(self, n: int, mark) -> None:
        self._count += n
        if self._count > MAX_YAML_NODES:
            raise LimitError(None, None, f"holds more than {MAX_YAML_NODES} values (aliases expanded)", mark)

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        if self.check_event(AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise LimitError(None, None, f"more than {MAX_YAML_ALIASES} YAML aliases", mark)
            node = super().compose_node(parent, index)
            if id(node) not in self._weights:
                raise LimitError(None, None, "an alias refers to a node that contains it (a recursive structure)", mark)
            self._grow(self._weights[id(node)], mark)
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise LimitError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
        self._grow(1, mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        weights = self._weights
        if isinstance(node, ScalarNode):
            weights[id(node)] = 1
        elif isinstance(node, SequenceNode):
            weights[id(node)] = 1 + sum(weights[id(c)] for c in node.value)
        else:
            weights[id(node)] = 1 + sum(weights[id(k)] + weights[id(v)] for k, v in node.value)
        return node


class _Constructor(yaml.constructor.SafeConstructor):
    """Safe construction of JSON-like values only: string keys, no duplicate keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                if isinstance(key_node, ScalarNode):
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {_short(key_node.value)}", key_node.start_mark)
                    seen.add(key)
        mapping = super().construct_mapping(node, deep=deep)
        for key in mapping:
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, f"mapping keys must be strings, found {type(key).__name__} {_short(key)}", node.start_mark)
        return mapping

    def _refuse(self, node):
        raise yaml.constructor.ConstructorError(
            None, None, f"YAML type {node.tag!r} is not supported (JSON has no such type)", node.start_mark)


for _tag in ("binary", "set", "omap", "pairs", "timestamp"):
    _Constructor.add_constructor(f"tag:yaml.org,2002:{_tag}", _Constructor._refuse)


class _Resolver(yaml.resolver.Resolver):
    """YAML 1.1 implicit types minus timestamps (`2024-01-01` stays a string, as kubectl
    sends it)."""


_Resolver.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}

# libyaml's parser when available (events only: its composer recurses in C without a
# depth check), else PyYAML's; the composer and constructor above either way.
try:
    from yaml.cyaml import CParser as _Parser
except ImportError:  # pragma: no cover - PyYAML without libyaml
    _Parser = None


if _Parser is not None:

    class Loader(_Composer, _Parser, _Constructor, _Resolver):
        def __init__(self, stream):
            _Parser.__init__(self, stream)
            _Composer.__init__(self)
            _Constructor.__init__(self)
            _Resolver.__init__(self)

        # CParser implements get_node/check_node/get_single_node with its own composer.
        check_node = yaml.composer.Composer.check_node
        get_node = yaml.composer.Composer.get_node
        get_single_node = yaml.composer.Composer.get_single_node

else:  # pragma: no cover - PyYAML without libyaml

    class Loader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, _Composer, _Constructor,
                 _Resolver):
        def __init__(self, stream):
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            _Composer.__init__(self)
            _Constructor.__init__(self)
            _Resolver.__init__(self)


def load_all(text: str) -> list[Any]:
    """Every non-empty YAML document of `text`, within the limits (raises yaml.YAMLError)."""
    loader = Loader(text)
    try:
        docs = []
        while loader.check_data():
            doc = loader.get_data()
            if doc is not None:
                docs.append(doc)
        return docs
    finally:
        loader.dispose()


def yaml_error(exc: yaml.YAMLError) -> tuple[str, str]:
    """(" at line L, column C" or "", the problem) for any YAML error, short."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None)
    if problem is None:
        problem = getattr(exc, "reason", None) or type(exc).__name__
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and cmark is not None and (mark is None or (cmark.line, cmark.column) != (mark.line, mark.column)):
        problem = f"{problem} ({context} at line {cmark.line + 1}, column {cmark.column + 1})"
    return where, str(problem)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# ---------------------------------------------------------------------------- specs


def _path(root: str, parents: list, index: int) -> str:
    """The path of node `index` of a walk, rebuilt from parent links (only for problems)."""
    keys = []
    while index > 0:
        index, key = parents[index]
        keys.append(key)
    out = root
    for key in reversed(keys):
        out = _join(out, key)
    return out


def _join(path: str, key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    if isinstance(key, str) and key.replace("-", "").replace("_", "").isalnum() and len(key) <= 64:
        return f"{path}.{key}"
    return f"{path}[{_short(key)}]"


def shape_problems(spec: Any, path: str = "spec") -> list[tuple[str, str]]:
    """(path, reason) for a spec past the limits of this module (depth, size, numbers a
    JSON client cannot hold, free-form model configs past their caps). Cheap: one
    iterative walk (paths are rebuilt only for problems), stopped at MAX_SPEC_NODES
    values. Run before anything recursive or costly looks at a spec."""
    problems: list[tuple[str, str]] = []
    parents: list[tuple[int, Any]] = [(-1, None)]  # (parent index, key) of every container and value
    stack: list[tuple[Any, int, int]] = [(spec, 0, 0)]  # containers: (value, depth, index in parents)
    configs: list[tuple[int, Any]] = []

    def scalar(value: Any, index: int) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, int):
            if not INT64[0] <= value <= INT64[1]:
                problems.append((_path(path, parents, index), "integer out of range: at most 2^63-1 (int64) in magnitude"))
        elif isinstance(value, float):
            if not math.isfinite(value):
                problems.append((_path(path, parents, index), "must be a finite number (JSON has no NaN or Infinity)"))
        else:
            problems.append((_path(path, parents, index), f"unsupported value of type {type(value).__name__}"))

    if not isinstance(spec, (dict, list)):
        scalar(spec, 0)
        stack = []
    while stack:
        node, depth, index = stack.pop()
        if depth >= MAX_SPEC_DEPTH and node:
            problems.append((_path(path, parents, index), f"nested deeper than {MAX_SPEC_DEPTH} levels"))
        elif isinstance(node, dict):
            # spec.model.<part>: its free-form config gets the config caps below
            part = depth == 2 and parents[index][1] in CONFIG_PARTS and parents[parents[index][0]][1] == "model"
            for key, item in node.items():
                if not isinstance(key, str):
                    problems.append((_path(path, parents, index), f"mapping keys must be strings, found {type(key).__name__}"))
                    break
                parents.append((index, key))
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1, len(parents) - 1))
                    if part and key == "config":
                        configs.append((len(parents) - 1, item))
                else:
                    scalar(item, len(parents) - 1)
        else:
            for i, item in enumerate(node):
                parents.append((index, i))
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1, len(parents) - 1))
                else:
                    scalar(item, len(parents) - 1)
        if len(parents) > MAX_SPEC_NODES:
            problems.append((path, f"holds more than {MAX_SPEC_NODES} values"))
            break
        if len(problems) >= 20:
            break
    if problems:
        return problems
    for index, config in configs:
        where = _path(path, parents, index)
        if isinstance(config, dict) and len(config) > MAX_CONFIG_KEYS:
            problems.append((where, f"has more than {MAX_CONFIG_KEYS} entries"))
            continue
        if _depth(config) > MAX_CONFIG_DEPTH:
            problems.append((where, f"nested deeper than {MAX_CONFIG_DEPTH} levels (a transformers config is flat)"))
            continue
        size = len(json.dumps(config, separators=(",", ":"), ensure_ascii=False).encode())
        if size > MAX_CONFIG_BYTES:
            problems.append((where, f"{size} bytes as JSON; at most {MAX_CONFIG_BYTES} (64 KiB)"))
    return problems


def _depth(value: Any) -> int:
    """Nesting depth (a scalar 0, {} or [] 1), iteratively."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            depth += 1
            stack.extend((v, depth) for v in node.values())
        elif isinstance(node, list):
            depth += 1
            stack.extend((v, depth) for v in node)
        deepest = max(deepest, depth)
    return deepest

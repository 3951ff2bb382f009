"""Credential-shaped values: found anywhere in a spec, scrubbed from every message.

A VLMPretrainRun is readable by everyone who can list runs, is copied into the stage's
ConfigMap, and its values end up in Events, status and logs; credentials belong in the
Secrets named by the `credentialsSecret` fields (vlm_api.cluster), or nowhere at all
(the service account's workload identity). `scan` reports where a spec holds
something that looks like one (the path and the kind, never the value); `redact`
replaces such substrings in any text before it is shown (error messages, Events).

What counts (the kinds): AWS access key ids (AKIA/ASIA...), a 40-character AWS secret
key next to one (same string or same mapping), Hugging Face, GitHub and Slack tokens,
PEM private keys, userinfo in a URL (`scheme://user[:password]@host`), presigned or
credential query parameters (`X-Amz-Signature=`, `X-Amz-Credential=`, `sig=`,
`token=`, ...), and a non-empty string under a key named like a credential
(`aws_secret_access_key`, `password`, `api_key`, `hf_token`, ...). Pure, no I/O.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterator

REDACTED = "<redacted>"

_AWS_KEY_ID = r"(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA|ASCA)[A-Z0-9]{16}"
_AWS_SECRET = r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
# scheme://user@ or scheme://user:password@ (a password may hold '/', as AWS secret keys do)
_USERINFO = r"[A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s?#@/:]{0,256}(?::[^\s?#@]{0,256})?@"
_QUERY_KEYS = (
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
    "awsaccesskeyid", "signature", "sig", "token", "access_token", "id_token", "api_key", "apikey", "key",
    "password", "secret",
)
# (kind, pattern) for substrings that are credentials wherever they appear.
PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("an AWS access key id", re.compile(rf"(?<![A-Z0-9]){_AWS_KEY_ID}(?![A-Z0-9])")),
    ("a Hugging Face token", re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,255}")),
    ("a GitHub token", re.compile(r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{30,255}|github_pat_[A-Za-z0-9_]{40,255})")),
    ("a Slack token", re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,255}")),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]{0,64}PRIVATE KEY-----")),
    ("userinfo in a URL", re.compile(_USERINFO)),
    ("a credential query parameter",
     re.compile(r"[?&;](?:" + "|".join(re.escape(k) for k in _QUERY_KEYS) + r")=", re.IGNORECASE)),
)
_ANY = re.compile("|".join(f"(?:{p.pattern})" for _, p in PATTERNS))  # one search for the common case
_KEY_ID = re.compile(_AWS_KEY_ID)
_SECRET_KEY = re.compile(_AWS_SECRET)
# Mapping keys whose (non-empty string) value is a credential, compared without case, '_' or '-'.
CREDENTIAL_KEYS = frozenset({
    "awsaccesskeyid", "accesskeyid", "awssecretaccesskey", "secretaccesskey", "secretkey", "awssessiontoken",
    "sessiontoken", "password", "passwd", "apikey", "accesstoken", "authtoken", "bearertoken", "hftoken",
    "huggingfacehubtoken", "huggingfacetoken", "githubtoken", "privatekey", "clientsecret",
})


@functools.lru_cache(maxsize=4096)
def _normal_key(key: str) -> str:
    return key.lower().replace("_", "").replace("-", "").replace(".", "").replace(" ", "")


def _maybe(text: str) -> bool:
    """Cheap substring tests every credential shape needs one of (most strings pass none)."""
    return ("@" in text or "=" in text or "hf_" in text or "gh" in text or "xox" in text or "PRIVATE KEY" in text
            or ("A" in text and len(text) >= 20))


def kinds(text: str) -> list[str]:
    """What credential shapes `text` holds (empty: none)."""
    if not _maybe(text) or not _ANY.search(text):
        return []
    found = [kind for kind, pattern in PATTERNS if pattern.search(text)]
    if _KEY_ID.search(text) and _SECRET_KEY.search(_KEY_ID.sub("", text)):
        found.append("an AWS secret access key")
    return found


def scan(value: Any, path: str = "spec", max_nodes: int = 1_000_000) -> Iterator[tuple[str, str]]:
    """(path, kind) for every credential-shaped string in a JSON-like value, keys included.
    Iterative (no recursion, whatever the nesting), bounded by `max_nodes` containers; a
    path is built only for a finding."""
    if isinstance(value, str):
        for kind in kinds(value):
            yield path, kind
    parents: list[tuple[int, Any]] = [(-1, None)]
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack and len(parents) <= max_nodes:
        node, index = stack.pop()
        if isinstance(node, dict):
            has_key_id = any(isinstance(v, str) and "A" in v and _KEY_ID.search(v) for v in node.values())
            for key, item in node.items():
                if isinstance(key, str):
                    key_kinds = kinds(key)
                    if key_kinds:
                        yield f"{_path(path, parents, index)}[{REDACTED}]", key_kinds[0] + " (as a mapping key)"
                        continue
                if isinstance(item, str):
                    if isinstance(key, str) and item.strip() and _normal_key(key) in CREDENTIAL_KEYS:
                        yield _path(path, parents, index, key), f"a credential (a value under {key!r})"
                    elif has_key_id and not _KEY_ID.search(item) and _SECRET_KEY.search(item):
                        yield _path(path, parents, index, key), "an AWS secret access key (next to an access key id)"
                    else:
                        for kind in kinds(item):
                            yield _path(path, parents, index, key), kind
                elif isinstance(item, (dict, list, tuple)):
                    parents.append((index, key))
                    stack.append((item, len(parents) - 1))
        elif isinstance(node, (list, tuple)):
            for i, item in enumerate(node):
                if isinstance(item, str):
                    for kind in kinds(item):
                        yield _path(path, parents, index, i), kind
                elif isinstance(item, (dict, list, tuple)):
                    parents.append((index, i))
                    stack.append((item, len(parents) - 1))


def _path(root: str, parents: list, index: int, *more: Any) -> str:
    keys = list(more)
    while index > 0:
        index, key = parents[index]
        keys.insert(0, key)
    out = root
    for key in keys:
        if isinstance(key, int):
            out += f"[{key}]"
        elif isinstance(key, str) and _SIMPLE.match(key):
            out += f".{key}"
        else:
            out += f"[{_key_repr(key)}]"
    return out


_SIMPLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


def _key_repr(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 66 else text[:60] + "...'"


def redact(text: str) -> str:
    """`text` with every credential-shaped substring replaced by <redacted>. Also the
    standalone 40-character base64 words an AWS secret key looks like, and the value of
    any credential query parameter or URL userinfo (only the shape is kept)."""
    if not text:
        return text
    out = re.sub(r"([A-Za-z][A-Za-z0-9+.-]{0,31}://)[^\s?#@/:'\"]{0,256}(?::[^\s?#@'\"]{0,256})?@", rf"\1{REDACTED}@", text)
    out = re.sub(
        r"([?&;](?:" + "|".join(re.escape(k) for k in _QUERY_KEYS) + r")=)[^&;#\s'\"]*",
        rf"\1{REDACTED}", out, flags=re.IGNORECASE,
    )
    out = re.sub(r"-----BEGIN [A-Z ]{0,64}PRIVATE KEY-----(?:(?!-----END).){0,8192}(?:-----END [A-Z ]{0,64}PRIVATE KEY-----)?",
                 REDACTED, out, flags=re.DOTALL)
    for kind, pattern in PATTERNS[:4]:
        out = pattern.sub(REDACTED, out)
    out = re.sub(
        _AWS_SECRET,
        lambda m: REDACTED if re.search(r"[A-Z]", m.group()) and re.search(r"[a-z]", m.group())
        and re.search(r"[0-9+/]", m.group()) else m.group(),
        out,
    )
    return out

"""What a webhook request is to the ``webhook`` source: :class:`HookRequest`, and the
:class:`Template` language its trigger reads it with (``{header:NAME}``, ``{query:NAME}``,
``{body:$.path}``), shared by the event mapping (``_webhook``) and the generic HMAC's
``signed`` (``_signatures``).
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from eventbus._errors import CloudEventError

if TYPE_CHECKING:
    from jsonpath_ng import JSONPath
    from jsonpath_ng.ext.parser import ExtendedJsonPathParser

__all__ = ["HookRequest", "Template", "raw", "template", "unauthorized"]

_REF = re.compile(r"\{(header|query|body):([^{}]+)\}")


def unauthorized(detail: str) -> CloudEventError:
    return CloudEventError(detail, status=401, title="Webhook not verified")


def raw(value: str) -> bytes:
    """A header value as the bytes that were sent (the edge decodes header bytes as latin-1,
    one character a byte): what a signature over it signed. Text no request header can
    give (a character over U+00FF) is taken as UTF-8."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode()


def _text(value: str) -> str:
    """A header value as text for an event attribute: its bytes read as UTF-8 where they are
    that (a ``café`` sent in UTF-8 was ``cafÃ©``), as they came otherwise."""
    if value.isascii():
        return value
    try:
        return raw(value).decode()
    except UnicodeDecodeError:
        return value


@dataclass(frozen=True)
class HookRequest:
    """One request to a hook: ``headers`` with lower-case names, ``query`` the raw query
    string."""

    method: str
    headers: Mapping[str, str]
    query: str
    body: bytes

    def header(self, name: str) -> str:
        """The header's value; raises 401 when it is missing (a verification header)."""
        found = self.headers.get(name.lower())
        if not found:
            raise unauthorized(f"header {name} is missing")
        return found

    @cached_property
    def params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)


class Template:
    """Text with ``{header:NAME}``, ``{query:NAME}`` and ``{body:JSONPATH}`` references,
    compiled once; ``render`` gives None when a reference finds nothing. ``body`` is the body
    as the event's data: a JSON body parsed, a form post as an object."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._parts: list[str | tuple[str, str, JSONPath | None]] = []
        end = 0
        for ref in _REF.finditer(text):
            self._parts.append(text[end : ref.start()])
            where, what = ref[1], ref[2].strip()
            self._parts.append((where, what, _jsonpath(what) if where == "body" else None))
            end = ref.end()
        self._parts.append(text[end:])
        if "{" in "".join(p for p in self._parts if isinstance(p, str)):
            raise ValueError(
                f"{text!r}: write references as {{header:NAME}}, {{query:NAME}} or {{body:$.path}}"
            )

    @property
    def kinds(self) -> set[str]:
        """The kinds of reference in the text: ``header``, ``query``, ``body``."""
        return {part[0] for part in self._parts if not isinstance(part, str)}

    def names(self, kind: str) -> set[str]:
        """The names the text's references of ``kind`` read, as they are looked up."""
        return {part[1] for part in self._parts if not isinstance(part, str) and part[0] == kind}

    def render(self, request: HookRequest, body: Any = None) -> str | None:
        out = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            found = _lookup(request, body, *part)
            if found is None or found == "":
                return None
            out.append(_text(found) if part[0] == "header" else found)
        return "".join(out)

    def signed(self, request: HookRequest) -> bytes | None:
        """The bytes a signature over this template signed: header values as they were sent,
        the rest in UTF-8; None when a reference finds nothing (no body: ``{body}`` is
        the signer's, not a reference)."""
        out = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part.encode())
                continue
            found = _lookup(request, None, *part)
            if found is None or found == "":
                return None
            out.append(raw(found) if part[0] == "header" else found.encode())
        return b"".join(out)


@functools.cache
def _parser() -> ExtendedJsonPathParser:
    # jsonpath-ng is imported when a spec is validated, not with eventbus.sources, and its
    # parser (~40 ms of table building) is made once
    from jsonpath_ng.ext.parser import ExtendedJsonPathParser

    return ExtendedJsonPathParser()


def _jsonpath(path: str) -> JSONPath:
    from jsonpath_ng.exceptions import JSONPathError

    if not path.startswith("$"):
        raise ValueError(f"a body reference is a JSONPath starting at '$': {path!r}")
    try:
        return _parser().parse(path)
    except (JSONPathError, ValueError, TypeError, AttributeError) as exc:
        # jsonpath-ng reports some malformed input as plain Python errors
        raise ValueError(f"invalid JSONPath {path!r}: {exc}") from None


def _lookup(
    request: HookRequest, body: Any, where: str, what: str, path: JSONPath | None
) -> str | None:
    if where == "header":
        return request.headers.get(what.lower())
    if where == "query":
        values = request.params.get(what)
        return values[0] if values else None
    assert path is not None
    if "?" in what and isinstance(body, dict | list):
        # jsonpath-ng's filter ("?", its parentheses optional) applied to an object replaces
        # it, in the document it searches, by the list of its values: the body is the
        # event's data
        body = copy.deepcopy(body)
    try:
        found = path.find(body) if isinstance(body, dict | list) else []
    except Exception:
        return None  # a filter that cannot be followed here selects nothing
    if not found or isinstance(found[0].value, dict | list) or found[0].value is None:
        return None
    value = found[0].value
    return str(value).lower() if isinstance(value, bool) else str(value)


def template(value: str | None) -> Template | None:
    return None if value is None else Template(value)

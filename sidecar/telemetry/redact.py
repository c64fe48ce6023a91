"""Scrubbing secrets from text the sidecar writes: log records, error reasons, trace strings.

What counts as a secret:
  - the value of a credential-like header or parameter (`Authorization`, `Proxy-Authorization`,
    `Cookie`, `Set-Cookie`, `X-Api-Key`, anything named like `*token*`, `*secret*`, `*password*` ...),
    wherever it shows up as `name: value`, `name=value` or `'name': 'value'` (aiohttp's parser errors
    quote the raw header line, so a bad line still names its header);
  - a `Bearer`/`Basic`/... credential and the password of a `scheme://user:password@` URL;
  - every `${VAR}` value the policy expanded (`Policy.secrets`), wherever it appears.

`install_log_redaction()` wraps the logging record factory, so every record of every logger
(aiohttp.server, aiohttp.access, asyncio, sidecar.*) is scrubbed when it is made, whatever handlers
are attached later: its message, its formatted exception and its stack.
"""
from __future__ import annotations

import logging
import re
import threading
import weakref
from typing import Callable, Iterable

REDACTED = "<redacted>"
# A `${VAR}` value this short is a port or a flag, not a credential: scrubbing it would shred the logs.
MIN_SECRET_LEN = 4

_NAME = (r"(?:proxy-)?authorization|(?:set-)?cookie|[\w.-]*(?:api[-_]?key|apikey|token|secret|passw(?:or)?d"
         r"|session|credential|signature)[\w.-]*|x-amz-security-token|x-goog-api-key")
# name, then `: ` or `=` (optionally inside quotes, as in a dict repr), then the value up to the end of
# the line, a quote, a `&`, or an escaped CR/LF as it appears in a bytes repr.
_FIELD = re.compile(
    rf"(?i)(?<![\w-])({_NAME})(['\"]?\s*[:=]\s*['\"]?)((?:(?!\\r|\\n)[^\r\n'\"&])+)")
# Case-sensitive: "Basic dXNl..." is a credential, "basic auth is on" is prose.
_SCHEME_CRED = re.compile(r"\b([Bb]earer|BEARER|Basic|BASIC|Digest|Negotiate)(\s+)([A-Za-z0-9._~+/=:-]{4,})")
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@'\"]*:)([^@/\s'\"]+)(@)")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every secret it holds replaced by "<redacted>"."""
    for secret in secrets:               # literal values first: they may sit anywhere
        if len(secret) >= MIN_SECRET_LEN and secret in text:
            text = text.replace(secret, REDACTED)
    if ":" not in text and "=" not in text and " " not in text:
        return text
    text = _FIELD.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    text = _SCHEME_CRED.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    return _URL_PASSWORD.sub(lambda m: m.group(1) + REDACTED + m.group(3), text)


class _Secrets:
    """The `${VAR}` values of every live runtime's current policy (tests run several in one process)."""

    def __init__(self) -> None:
        self._sources: weakref.WeakSet = weakref.WeakSet()
        self._extra: set[str] = set()
        self._lock = threading.Lock()

    def watch(self, runtime) -> None:
        with self._lock:
            self._sources.add(runtime)

    def add(self, values: Iterable[str]) -> None:
        with self._lock:
            self._extra.update(values)

    def current(self) -> list[str]:
        found = set(self._extra)
        with self._lock:
            sources = list(self._sources)
        for runtime in sources:
            try:
                found.update(runtime.policy.secrets)
            except AttributeError:       # a runtime half-built or torn down
                continue
        return sorted(found, key=len, reverse=True)   # longest first: no fragment of one survives


SECRETS = _Secrets()
_installed: list[Callable] = []


def _scrub_record(record: logging.LogRecord) -> None:
    secrets = SECRETS.current()
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken format string: logging reports it itself later
        message = None
    if message is not None:
        clean = redact(message, secrets)
        if clean != message:
            record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[0] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        clean = redact(text, secrets)
        if clean != text:                # handlers append exc_text when exc_info is gone
            record.exc_info, record.exc_text = None, clean
    if record.stack_info:
        record.stack_info = redact(record.stack_info, secrets)


def install_log_redaction(runtime=None) -> None:
    """Scrub every log record made from now on; idempotent. `runtime`: scrub its policy's secrets too."""
    if runtime is not None:
        SECRETS.watch(runtime)
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            _scrub_record(record)
        except Exception:  # noqa: BLE001 - scrubbing must never cost the log line itself
            record.msg, record.args, record.exc_info = "<log record withheld: redaction failed>", None, None
        return record

    logging.setLogRecordFactory(factory)
    _installed.append(factory)

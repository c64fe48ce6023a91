"""What every translation offers, and the one error a request translation raises.

A translation `APP/PROVIDER` turns the app's request (in the APP API) into the PROVIDER's, and the
provider's answer -- a JSON body, an error, or an event stream -- back into what the app's SDK parses.
Everything here is pure: dicts in, dicts out, bytes in, bytes out; the clock is a parameter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Refused(Exception):
    """The request uses something the provider cannot do: the app gets a 400 naming `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Plan:
    """A translated request and what its answer's translation needs to know about it."""
    body: dict
    stream: bool = False
    include_usage: bool = False              # OpenAI apps: a final usage chunk was asked for
    legacy_functions: bool = False           # OpenAI apps that sent `functions`: answer `function_call`
    model: str | None = None                 # the model the app asked for


class StreamTranslator(Protocol):
    """Provider SSE bytes in, app SSE bytes out, chunk by chunk."""
    done: bool                               # nothing more will be said: the end, or an error event
    failed: bool                             # ... and it was an error event
    began: bool                              # the answer itself has started (text, a tool call, a stop)
    error_body: dict | None                  # the error event's body, in the app's API, once failed

    def feed(self, chunk: bytes) -> bytes: ...
    def end(self) -> bytes: ...              # the upstream's stream ended; an error event if early
    def fail(self, reason: str) -> bytes: ...  # the upstream's stream broke; always an error event


class Translation(Protocol):
    name: str                                # "APP/PROVIDER", e.g. openai-chat/anthropic-messages
    path: str                                # the provider's endpoint, when the rewrite names none
    app_headers: tuple[str, ...]             # the app's credentials and API headers: never forwarded
    provider_headers: tuple[tuple[str, str], ...]  # sent unless the upstream or rewrite sets them

    def request(self, doc: object, *, max_tokens: int) -> Plan: ...
    def answer(self, doc: object, plan: Plan, *, now: int) -> dict: ...
    def error(self, status: int, doc: object) -> tuple[int, dict]: ...
    def refusal(self, reason: str) -> dict: ...  # the app API's 400 body
    def stream(self, plan: Plan, *, now: int) -> StreamTranslator: ...


def as_dict(doc: object, what: str) -> dict:
    if not isinstance(doc, dict):
        raise Refused(f"{what} is not a JSON object")
    return doc


def as_list(value: object, what: str) -> list:
    if not isinstance(value, list):
        raise Refused(f"{what} is not a list")
    return value


def text_of(value: object, what: str) -> str:
    """A string, or a list of text parts/blocks joined (both APIs allow either for plain text)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    parts = []
    for part in as_list(value, what):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise Refused(f"{what}: only text parts are translated here")
        parts.append(part["text"])
    return "\n".join(parts)


def number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Refused(f"{what} is not a number")
    return value

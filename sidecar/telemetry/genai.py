"""What one try to an LLM API asked for and what its answer said: the record that rides on a
`TryRecord` (telemetry/records.py) into the span, metric and signal sinks. Filled by the scanner in
`sidecar/llm/usage.py`; defined here, below it, so that telemetry never imports the data plane."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Prices(Protocol):
    def price(self, model: str | None) -> tuple[float, float] | None: ...


@dataclass(slots=True)
class LlmCall:
    """One try's LLM figures. Request fields come from the body sent; the rest from the answer."""
    provider: str                          # gen_ai.provider.name: openai | anthropic
    operation: str                         # gen_ai.operation.name: chat | text_completion | embeddings
    api: str                               # chat.completions | completions | embeddings | responses | messages
    request_model: str | None = None       # as sent to this upstream (after json_map / translation)
    max_tokens: int | None = None
    stream: bool = False
    response_model: str | None = None
    response_id: str | None = None
    input_tokens: int | None = None        # includes provider-cached input, as the GenAI conventions ask
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    finish_reasons: list[str] = field(default_factory=list)
    first_chunk_ns: int = 0                # wall clock of the first SSE event (streams only)
    prices: "Prices | None" = None         # the policy's `llm.prices`, for cost()

    @property
    def has_usage(self) -> bool:
        return self.input_tokens is not None or self.output_tokens is not None

    @property
    def model(self) -> str | None:
        return self.response_model or self.request_model

    def cost(self) -> float | None:
        """In the currency of the policy's prices; None without a price for this model."""
        if self.prices is None or not self.has_usage:
            return None
        price = self.prices.price(self.response_model) or self.prices.price(self.request_model) \
            or self.prices.price("*")
        if price is None:
            return None
        per_in, per_out = price
        return ((self.input_tokens or 0) * per_in + (self.output_tokens or 0) * per_out) / 1e6

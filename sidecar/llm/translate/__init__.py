"""Translations between LLM provider APIs, by name (`rewrite: {translate: APP/PROVIDER}`)."""
from sidecar.llm.translate.anthropic_openai import ANTHROPIC_TO_OPENAI
from sidecar.llm.translate.base import Plan, Refused, StreamTranslator, Translation
from sidecar.llm.translate.openai_anthropic import OPENAI_TO_ANTHROPIC

TRANSLATIONS: dict[str, Translation] = {t.name: t for t in (OPENAI_TO_ANTHROPIC, ANTHROPIC_TO_OPENAI)}

__all__ = ["TRANSLATIONS", "Plan", "Refused", "StreamTranslator", "Translation"]

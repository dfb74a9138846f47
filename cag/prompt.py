"""Turn documents and questions into token ids that meet at a fixed boundary.

The context prefix (instructions + documents) is tokenized on its own and the
question suffix on its own, so no token merges across the boundary: the tokens a
cache holds are exactly the first tokens of every full prompt built from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .errors import ContextTooLongError, PromptError

__all__ = ["DEFAULT_INSTRUCTIONS", "PromptBuilder", "render_documents"]

DEFAULT_INSTRUCTIONS = (
    "You answer questions using only the documents below. "
    "Answer briefly and name the source document when you can. "
    "If the documents do not contain the answer, say so."
)

# Stands in for the documents when rendering the question turn: the turn must not
# depend on what the system message holds (checked at build time).
_PLACEHOLDER = "\u2063"


def render_documents(documents: Sequence[Any]) -> str:
    """Documents as text, each tagged with its source so answers can cite it."""
    return "\n\n".join(f'<document source="{doc.source}">\n{doc.text.strip()}\n</document>' for doc in documents)


@dataclass
class PromptBuilder:
    """Builds context and question token ids with the model's chat template."""

    tokenizer: Any
    instructions: str = DEFAULT_INSTRUCTIONS

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def context_text(self, documents: Sequence[Any]) -> str:
        system = f"{self.instructions}\n\n{render_documents(documents)}"
        if not self.has_chat_template:
            return f"{system}\n\n"
        prefix = self._render([{"role": "system", "content": system}], generation_prompt=False)
        full = self._render([{"role": "system", "content": system}, {"role": "user", "content": "?"}], generation_prompt=True)
        if not full.startswith(prefix) or full[len(prefix):] != self._question_text("?"):
            raise PromptError(
                "the model's chat template does not render the documents as a prefix that questions can follow; "
                "use a model whose template supports a system message"
            )
        return prefix

    def context_ids(self, documents: Sequence[Any], max_context: int | None = None) -> list[int]:
        """Token ids of the context prefix; raises before any prefill if they cannot fit."""
        ids = self._encode(self.context_text(documents), special=not self.has_chat_template)
        if max_context is not None and len(ids) >= max_context:
            raise ContextTooLongError(
                f"the documents take {len(ids):,} tokens but the model's context window is {max_context:,} tokens: "
                "pass fewer or shorter documents, or a model with a longer window"
            )
        return ids

    def question_ids(self, question: str) -> list[int]:
        """Token ids of a question turn, ending where the answer starts."""
        if not question.strip():
            raise PromptError("the question is empty: pass some text to ask")
        return self._encode(self._question_text(question.strip()), special=False)

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a whole chat, ending where the assistant's answer starts."""
        if not self.has_chat_template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return self._encode(text, special=True)
        return self._encode(self._render(list(messages), generation_prompt=True), special=False)

    def _question_text(self, question: str) -> str:
        if not self.has_chat_template:
            return f"Question: {question}\nAnswer:"
        system = [{"role": "system", "content": _PLACEHOLDER}]
        prefix = self._render(system, generation_prompt=False)
        full = self._render(system + [{"role": "user", "content": question}], generation_prompt=True)
        return full[len(prefix):]

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # templates raise their own exception types
            raise PromptError(f"the model's chat template failed: {exc}") from exc

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

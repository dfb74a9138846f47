"""Turn documents and questions into token ids that meet at a fixed boundary.

The context prefix (instructions + documents) is tokenized on its own and the
question suffix on its own, so no token merges across the boundary: the tokens a
cache holds are exactly the first tokens of every full prompt built from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import ContextTooLongError, PromptError

__all__ = ["DEFAULT_INSTRUCTIONS", "PromptBuilder", "render_documents"]

DEFAULT_INSTRUCTIONS = (
    "You answer questions using only the documents below. "
    "Answer briefly and name the source document when you can. "
    "If the documents do not contain the answer, say so."
)

# Message contents are rendered as numbered slots: what the template writes around them
# is tokenized with its control tokens, what fills them as plain text, so a document or
# a message that spells `<|im_start|>` cannot open a turn of its own.
_SLOT = "\ue000{}\ue001"
_SLOTS = re.compile("\ue000(\\d+)\ue001")


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
        """The context prefix as text, for display; ``context_ids`` is what is cached."""
        return self._fill(*self._context(documents))

    def context_ids(self, documents: Sequence[Any], max_context: int | None = None) -> list[int]:
        """Token ids of the context prefix; raises before any prefill if they cannot fit."""
        slotted, contents = self._context(documents)
        ids = self._encode(slotted, contents, bos=not self.has_chat_template)
        if max_context is not None and len(ids) >= max_context:
            raise ContextTooLongError(
                f"the documents take {len(ids):,} tokens but the model's context window is {max_context:,} tokens: "
                "pass fewer or shorter documents, or a model with a longer window"
            )
        return ids

    def context_parts(self) -> tuple[list[int], list[int]]:
        """The context prefix without its documents, cut where they go: (head, tail) token ids.

        The head is the template up to the system message and the instructions; the tail
        closes the message. Between them, ``passage_ids`` of any documents in any order
        make the text ``context_text`` gives for them (each part tokenized on its own).
        """
        slotted, _ = self._context([])
        head, tail = slotted.split(_SLOT.format(0))
        return self._encode(head, [], bos=not self.has_chat_template) + self._plain(self.instructions), self._encode(tail, [])

    def passage_ids(self, document: Any) -> list[int]:
        """Token ids of one document (or passage) as it follows the instructions or another document."""
        return self._plain("\n\n" + render_documents([document]))

    def text_ids(self, text: str) -> list[int]:
        """Token ids of untrusted text: every special-token string in it stays text."""
        return self._plain(text)

    def question_ids(self, question: str) -> list[int]:
        """Token ids of a question turn, ending where the answer starts."""
        if not question.strip():
            raise PromptError("the question is empty: pass some text to ask")
        question = question.strip()
        if not self.has_chat_template:
            return self._encode("Question: " + _SLOT.format(0) + "\nAnswer:", [question])
        messages = [{"role": "system", "content": ""}, {"role": "user", "content": question}]
        prefix = self._slotted(messages[:1], generation_prompt=False)
        full = self._slotted(messages, generation_prompt=True)
        return self._encode(full[len(prefix):], [m["content"] for m in messages])

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a whole chat, ending where the assistant's answer starts."""
        contents = [m["content"] for m in messages]
        if not self.has_chat_template:
            text = "".join(f"{m['role']}: {_SLOT.format(i)}\n" for i, m in enumerate(messages)) + "assistant:"
            return self._encode(text, contents, bos=True)
        return self._encode(self._slotted(messages, generation_prompt=True), contents)

    def _context(self, documents: Sequence[Any]) -> tuple[str, list[str]]:
        """The context prefix as slotted text and the contents of its slots."""
        contents = [f"{self.instructions}\n\n{render_documents(documents)}"]
        if not self.has_chat_template:
            return _SLOT.format(0) + "\n\n", contents
        system = [{"role": "system", "content": contents[0]}]
        prefix = self._slotted(system, generation_prompt=False)
        full = self._slotted(system + [{"role": "user", "content": "?"}], generation_prompt=True)
        if not full.startswith(prefix) or _SLOT.format(0) not in prefix:
            raise PromptError(
                "the model's chat template does not render the documents as a prefix that questions can follow; "
                "use a model whose template supports a system message"
            )
        return prefix, contents

    def _slotted(self, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
        slots = [{**m, "content": _SLOT.format(i)} for i, m in enumerate(messages)]
        try:
            return self.tokenizer.apply_chat_template(slots, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # templates raise their own exception types
            raise PromptError(f"the model's chat template failed: {exc}") from exc

    @staticmethod
    def _fill(slotted: str, contents: Sequence[str]) -> str:
        return _SLOTS.sub(lambda m: contents[int(m.group(1))], slotted)

    def _encode(self, slotted: str, contents: Sequence[str], bos: bool = False) -> list[int]:
        """Template text with its control tokens; slot contents with every special-token string split."""
        parts = _SLOTS.split(slotted)
        ids: list[int] = []
        if bos:
            ids += self._bos()
        for index, part in enumerate(parts):
            if index % 2 == 0:
                ids += self.tokenizer(part, add_special_tokens=False)["input_ids"] if part else []
            else:
                ids += self._plain(contents[int(part)])
        return ids

    def _bos(self) -> list[int]:
        """The tokenizer's beginning-of-sequence token, if it adds one (chat templates write their own)."""
        bos = self.tokenizer.bos_token_id
        return [bos] if bos is not None and self.tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos] else []

    def _plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

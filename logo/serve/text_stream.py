"""Token ids to text as they arrive, for one choice: incremental detokenizing and OpenAI ``stop`` strings.

Each new token re-decodes the choice's tokens and hands out only the text that is final: not an incomplete
UTF-8 sequence (shown as U+FFFD until its last byte comes) and not a tail that could still grow into a stop
string. A stop string ends the choice; neither it nor anything after it is returned.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0  # characters handed out so far
        self.stopped = False  # a stop string was seen

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Take one token; return the newly final text (possibly empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.text
        # U+FFFD placeholders of a character still arriving are not text yet: no stop string is looked for in them
        # (a stop string holding U+FFFD must not fire on half a character), and the hold counts back from the last
        # complete character, or the character before them (maybe a stop string's start) would go out too early
        complete = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
        return self._release(text, complete)

    def finish(self) -> str:
        """The rest of the text once the choice has ended (nothing after a stop string): every character is final
        now, so a stop string may also end in what was held back."""
        if self.stopped:
            return ""
        text = self.text
        out = self._release(text, len(text))
        return out if self.stopped else out + self._take(text)

    def _release(self, text: str, complete: int) -> str:
        """The newly final text of ``text``, whose first ``complete`` characters are complete: up to the first stop
        string found in them (then the choice has stopped), else up to the hold."""
        start = max(0, self.sent - self.hold)
        cut = min((i for i in (text.find(s, start, complete) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(text[:cut])
        return self._take(text[: max(complete - self.hold, self.sent)])

    def _take(self, text: str) -> str:
        delta = text[self.sent :]
        self.sent = len(text)
        return delta

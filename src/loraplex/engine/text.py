"""Turning generated token ids into text deltas, and cutting at stop strings.

The whole output is decoded again at every token (microseconds for answers of this size), which is
the robust way with byte-level BPE and SentencePiece tokenizers: a character split over tokens is
held back until complete (the decoder shows it as U+FFFD), and so is any tail that could be the
start of a stop string, so a stop string never reaches the client, even split over tokens.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self.tok = tokenizer
        self.stop = stop
        self.emitted = 0  # characters of the decoded output already sent
        self.text = ""

    def push(self, output_ids: list[int], final: bool = False) -> tuple[str, bool]:
        """Decode everything so far; return (new text to send, whether a stop string was hit)."""
        self.text = self.tok.decode(output_ids, skip_special_tokens=True)
        end = len(self.text)
        if self.stop:
            hits = [i for s in self.stop if (i := self.text.find(s, max(0, self.emitted - len(s)))) >= 0]
            if hits:
                cut = min(hits)
                out = self.text[self.emitted : cut]
                self.emitted = max(self.emitted, cut)
                self.text = self.text[:cut]
                return out, True
            if not final:
                for s in self.stop:  # hold back a tail that may grow into a stop string
                    for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                        if self.text.endswith(s[:k]):
                            end = min(end, len(self.text) - k)
                            break
        if not final:
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out, False

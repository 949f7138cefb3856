"""Character-level tokenizer of the built-in tiny model.

The built-in tasks (4x4 Sudoku, Countdown) are written in a compact alphabet, so one character is one
token and the vocabulary stays tiny (55 ids): a small embedding and output head, and no merges to learn.

Ids are fixed and part of the saved model's contract:

    0 <pad>   1 <eos>   2 <mask>   3 <bos>            special tokens
    4..13     "0".."9"
    14..28    " " "\\n" "/" "+" "-" "*" "(" ")" "=" "<" ">" ":" "," "." "?"
    29..54    "a".."z"

``encode`` never produces a special token from text: "<eos>" in a string is five characters. A character
outside the vocabulary raises ``ValueError`` naming it (a silent <unk> would hide a prompt-format bug).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import torch

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<mask>", "<bos>")
CHARACTERS: str = "0123456789" + " \n/+-*()=<>:,.?" + "abcdefghijklmnopqrstuvwxyz"
TOKENIZER_FILE = "tokenizer.json"
_FORMAT = "dmpo_fast.char_tokenizer"


class CharTokenizer:
    """One token per character over a fixed alphabet, plus <pad>, <eos>, <mask>, <bos>."""

    def __init__(self, characters: str = CHARACTERS, special_tokens: Sequence[str] = SPECIAL_TOKENS):
        if len(set(characters)) != len(characters):
            dup = sorted({c for c in characters if characters.count(c) > 1})
            raise ValueError(f"characters must be distinct, got repeated {dup!r}")
        if tuple(special_tokens[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"special_tokens must start with {SPECIAL_TOKENS}, got {tuple(special_tokens)}")
        self.special_tokens: tuple[str, ...] = tuple(special_tokens)
        self.characters: str = characters
        self._char_to_id = {c: i + len(self.special_tokens) for i, c in enumerate(characters)}
        self._id_to_text = list(self.special_tokens) + list(characters)

    # ids of the special tokens (fixed positions, see the module docstring)
    pad_id = 0
    eos_id = 1
    mask_id = 2
    bos_id = 3

    # Hugging Face spelling of the same ids, so code written for HF tokenizers reads them unchanged.
    pad_token_id = pad_id
    eos_token_id = eos_id
    mask_token_id = mask_id
    bos_token_id = bos_id

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_text)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        table = self._char_to_id
        for pos, ch in enumerate(text):
            tid = table.get(ch)
            if tid is None:
                raise ValueError(
                    f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the vocabulary; "
                    f"known characters: {self.characters!r}"
                )
            ids.append(tid)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(
        self, ids: Iterable[int] | torch.Tensor, *, skip_special: bool = True, stop_at_eos: bool = False
    ) -> str:
        """Text of ``ids``. ``stop_at_eos`` drops everything from the first <eos> on (a sampler that
        fills a fixed-length answer may write tokens after the end)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}; use batch_decode")
            ids = ids.tolist()
        n_special = len(self.special_tokens)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range [0, {self.vocab_size})")
            if stop_at_eos and i == self.eos_id:
                break
            if skip_special and i < n_special:
                continue
            out.append(self._id_to_text[i])
        return "".join(out)

    def batch_decode(
        self,
        ids: torch.Tensor | Sequence[Sequence[int]],
        *,
        skip_special: bool = True,
        stop_at_eos: bool = False,
    ) -> list[str]:
        return [self.decode(row, skip_special=skip_special, stop_at_eos=stop_at_eos) for row in ids]

    def batch_encode(
        self,
        texts: Sequence[str],
        *,
        pad_left: bool = True,
        add_bos: bool = False,
        add_eos: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad to the longest text. Returns ``(ids[B, L] long, attention_mask[B, L] long)``
        with attention_mask 1 on real tokens, 0 on padding. Left padding (the default) puts every
        prompt's last token in the last column, which is where generation continues."""
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of strings, got a single str")
        rows = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        length = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row)
            if n == 0:
                continue
            cols = slice(length - n, length) if pad_left else slice(0, n)
            ids[b, cols] = torch.tensor(row, dtype=torch.long)
            mask[b, cols] = 1
        return ids, mask

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``tokenizer.json`` into ``directory`` (created if needed); return the file path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_FILE)
        payload = {
            "format": _FORMAT,
            "version": 1,
            "special_tokens": list(self.special_tokens),
            "characters": self.characters,
        }
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=True, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CharTokenizer:
        """Read a tokenizer written by ``save`` (``directory`` or the JSON file itself)."""
        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"no {TOKENIZER_FILE} found at {os.fspath(directory)!r}")
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path!r} is not a dmpo_fast character tokenizer file")
        return cls(characters=payload["characters"], special_tokens=payload["special_tokens"])

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CharTokenizer)
            and self.characters == other.characters
            and self.special_tokens == other.special_tokens
        )

    def __hash__(self) -> int:
        return hash((self.characters, self.special_tokens))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

"""The built-in character tokenizer as a Hugging Face tokenizer, for trainers that insist on one (TRL).

Same ids as ``dmpo_fast.tokenizer.CharTokenizer``: one token per character, ``<pad>`` 0, ``<eos>`` 1,
``<mask>`` 2, ``<bos>`` 3. One difference: the HF tokenizer reads the literal text ``"<eos>"`` as the special
token, where ``CharTokenizer`` reads five characters; the built-in tasks never write it.
"""

from __future__ import annotations

from dmpo_fast.tokenizer import CharTokenizer


def hf_char_tokenizer(tokenizer: CharTokenizer | None = None, *, padding_side: str = "left"):
    """A ``PreTrainedTokenizerFast`` with ``tokenizer``'s vocabulary (default: the built-in one)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tokenizer = CharTokenizer() if tokenizer is None else tokenizer
    if not isinstance(tokenizer, CharTokenizer):
        raise ValueError(f"tokenizer must be a CharTokenizer or None, got {type(tokenizer).__name__}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    vocab = {text: i for i, text in enumerate([*tokenizer.special_tokens, *tokenizer.characters])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    core.decoder = decoders.Fuse()  # join tokens without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        mask_token="<mask>",
        bos_token="<bos>",
        padding_side=padding_side,
    )

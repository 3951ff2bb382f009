"""The tokenizer: a directory AutoTokenizer loads, or the in-process byte tokenizer.

`model.tokenizer` (vlm_api.schema.Tokenizer) picks the source:

* ``path``: a directory (local, ``file://`` or ``s3://``, downloaded first) that
  ``AutoTokenizer.from_pretrained`` loads; defaults to the LLM's path.
* ``builtin: bytes``: a byte-level fast tokenizer built here with the ``tokenizers``
  library, nothing downloaded: ids 0..255 are the bytes themselves, then the specials
  ``<s>`` (bos, 256), ``</s>`` (eos, 257), ``<pad>`` (258) and the image placeholder (259).

Either way the image placeholder (``tokenizer.imageToken``, default ``<image>``) is added
as a special token when missing, and a pad token is guaranteed (eos is reused when the
tokenizer has none). Raw text is always encoded with ``split_special_tokens=True``, so a
literal "<image>" in a document is text, never a placeholder: placeholders come only from
image segments.
"""

from __future__ import annotations

import dataclasses
import logging

from vlm_api.schema import ModelSpec

from vlm_api.cluster import secret_credentials

from .remote import localize

log = logging.getLogger(__name__)

BYTE_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (what ByteLevel pre-tokenizes to)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_byte_tokenizer(image_token: str = "<image>"):
    """A byte-level PreTrainedTokenizerFast: token id == byte value for 0..255."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    mapping = _bytes_to_unicode()
    core = Tokenizer(models.BPE(vocab={mapping[b]: b for b in range(256)}, merges=[]))
    core.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **BYTE_SPECIALS)
    tok.add_special_tokens({"additional_special_tokens": [image_token]})
    return tok


@dataclasses.dataclass
class TokenizerBundle:
    """The tokenizer plus the ids the trainer needs."""

    tokenizer: object
    image_token: str
    image_token_id: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    added_tokens: int  # tokens added here (0 for a tokenizer that had them all)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def load_tokenizer(model: ModelSpec) -> TokenizerBundle:
    spec = model.tokenizer
    image_token = spec.image_token
    added = 0
    if spec.builtin == "bytes":
        tok = build_byte_tokenizer(image_token)
    else:
        from transformers import AutoTokenizer

        path = spec.path or model.llm.path
        if path is None:  # the API validator rejects this; keep a clear message anyway
            raise ValueError("model.tokenizer: set path or builtin when the LLM is built from config")
        # the tokenizer reads with the LLM's credentialsSecret
        creds = secret_credentials(model.llm.credentials_secret)
        tok = AutoTokenizer.from_pretrained(localize(path, kind="tokenizer", credentials=creds))
        if image_token not in tok.get_vocab():
            from tokenizers import AddedToken

            added += tok.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
        if tok.pad_token is None:
            if tok.eos_token is not None:
                tok.pad_token = tok.eos_token
            else:
                added += tok.add_special_tokens({"pad_token": "<pad>"})
    image_id = tok.convert_tokens_to_ids(image_token)
    return TokenizerBundle(
        tokenizer=tok,
        image_token=image_token,
        image_token_id=int(image_id),
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        pad_id=int(tok.pad_token_id),
        added_tokens=added,
    )


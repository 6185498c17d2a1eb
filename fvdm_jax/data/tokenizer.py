"""The UMT5 prompt tokenizer (Wan 2.1's text encoder's): a sentencepiece model read from a local
path, never downloaded.

`UMT5Tokenizer(path)(prompts)` gives (ids, mask), both (B, max_length) int32: the prompt's pieces,
then EOS (`</s>`, id 1 in T5/UMT5 models), then the pad id (`<pad>`, 0) to max_length (Wan uses
512); a longer prompt is cut to max_length - 1 pieces before its EOS. mask is 1 on the pieces and
the EOS, 0 on the padding. These are the ids of transformers' T5Tokenizer on the same model
(`T5Tokenizer.from_pretrained(folder)` with padding='max_length', truncation=True), which Wan and
diffusers' Wan pipeline call:

- every piece of text between special tokens is encoded by sentencepiece on its own (the model's
  normalization, its dummy prefix `▁`, collapsed whitespace), as the converted transformers
  tokenizer does;
- the model's control and unknown pieces written out in a prompt (`</s>`, `<pad>`, `<s>`,
  `<unk>`) are those tokens, not text;
- T5's sentinels `<extra_id_j>`, j < extra_ids, are the ids transformers appends after the
  sentencepiece vocabulary (size + extra_ids - 1 - j). extra_ids comes from the folder's
  tokenizer_config.json (300 for google/umt5-xxl), else it is transformers' default 100.

`clean=True` (the default) first cleans a prompt as Wan does (`clean='whitespace'`): HTML
entities unescaped twice, runs of whitespace made one space, the ends stripped. Wan also runs
ftfy.fix_text (repairs mojibake), which is not a dependency here and is not applied.

path: a .model file, or a folder holding spiece.model: the HF layout of google/umt5-xxl, a
diffusers pipeline folder (tokenizer/spiece.model) or a Wan release folder
(google/umt5-xxl/spiece.model).
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from fvdm_jax.errors import ConfigError

MODEL_FILE = "spiece.model"
# Where a folder may keep the model: HF tokenizer folder, diffusers pipeline, Wan release folder.
MODEL_PLACES = (MODEL_FILE, os.path.join("tokenizer", MODEL_FILE),
                os.path.join("google", "umt5-xxl", MODEL_FILE))
WAN_TEXT_LENGTH = 512
HF_DEFAULT_EXTRA_IDS = 100
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning without ftfy: HTML unescaped twice, whitespace runs -> one space."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def resolve_tokenizer_path(path: str) -> str:
    """The sentencepiece model file of `path` (a .model file or a folder, see the module doc)."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for place in MODEL_PLACES:
            candidate = os.path.join(path, place)
            if os.path.isfile(candidate):
                return candidate
        raise ConfigError(f"tokenizer folder {path} holds no {' or '.join(MODEL_PLACES)}: pass the "
                          f"sentencepiece .model file or the folder with spiece.model "
                          f"(google/umt5-xxl's tokenizer)")
    raise ConfigError(f"tokenizer {path} does not exist: pass the sentencepiece .model file or the "
                      f"folder with spiece.model (google/umt5-xxl's tokenizer)")


class UMT5Tokenizer:
    """Prompts -> (ids, mask) (B, max_length) int32, padded and truncated, EOS appended."""

    def __init__(self, path: str, max_length: int = WAN_TEXT_LENGTH, clean: bool = True,
                 extra_ids: int | None = None):
        try:
            import sentencepiece
        except ImportError:
            raise ImportError("the UMT5 tokenizer needs `pip install sentencepiece`") from None
        self.path = resolve_tokenizer_path(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"tokenizer {self.path} is not a sentencepiece model "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if int(max_length) < 1:
            raise ConfigError(f"tokenizer max_length must be >= 1, got {max_length}")
        self.max_length = int(max_length)
        self.clean = clean
        self.pad_id, self.eos_id = int(self.sp.pad_id()), int(self.sp.eos_id())
        if self.pad_id < 0 or self.eos_id < 0:
            raise ConfigError(f"tokenizer {self.path} has no pad or EOS piece (pad id "
                              f"{self.pad_id}, eos id {self.eos_id}); a T5/UMT5 model has both")
        self.extra_ids = self._extra_ids() if extra_ids is None else int(extra_ids)
        size = self.sp.get_piece_size()
        self.special = {self.sp.id_to_piece(i): i for i in range(size)
                        if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.special.pop("", None)
        names = sorted(self.special, key=len, reverse=True)  # longest first, as the HF matcher
        self._split = re.compile("|".join(map(re.escape, names))) if names else None

    def _extra_ids(self) -> int:
        config = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        if os.path.isfile(config):
            try:
                with open(config) as f:
                    value = json.load(f).get("extra_ids")
            except (OSError, ValueError, AttributeError):
                value = None
            if isinstance(value, int):
                return value
        return HF_DEFAULT_EXTRA_IDS

    @property
    def vocab_size(self) -> int:
        """Pieces of the sentencepiece model plus the sentinels after them."""
        return self.sp.get_piece_size() + self.extra_ids

    def _sentinel(self, text: str) -> int | None:
        match = _SENTINEL.fullmatch(text)
        if match and int(match.group(1)) < self.extra_ids:
            return self.sp.get_piece_size() + self.extra_ids - 1 - int(match.group(1))
        return None

    def _encode_text(self, text: str) -> list[int]:
        """Text between sentinels: special pieces as their ids, the rest through sentencepiece."""
        ids: list[int] = []
        start = 0
        for match in self._split.finditer(text) if self._split else ():
            if match.start() > start:
                ids += self.sp.encode(text[start:match.start()])
            ids.append(self.special[match.group(0)])
            start = match.end()
        if start < len(text):
            ids += self.sp.encode(text[start:])
        return ids

    def encode(self, text: str) -> list[int]:
        """The ids of one prompt with EOS, untruncated and unpadded."""
        if not isinstance(text, str):
            raise ConfigError(f"a prompt must be a str, got {type(text).__name__}")
        if self.clean:
            text = clean_prompt(text)
        ids: list[int] = []
        start = 0
        if self.extra_ids > 0:
            for match in _SENTINEL.finditer(text):
                sentinel = self._sentinel(match.group(0))
                if sentinel is None:
                    continue
                ids += self._encode_text(text[start:match.start()])
                ids.append(sentinel)
                start = match.end()
        ids += self._encode_text(text[start:])
        return ids + [self.eos_id]

    def __call__(self, prompts: str | Sequence[str],
                 max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), each (B, max_length) int32, of one prompt or a list of them."""
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.max_length if max_length is None else int(max_length)
        if length < 1:
            raise ConfigError(f"tokenizer max_length must be >= 1, got {length}")
        ids = np.full((len(prompts), length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), length), np.int32)
        for row, prompt in enumerate(prompts):
            tokens = self.encode(prompt)
            if len(tokens) > length:  # keep EOS last, as transformers truncates
                tokens = tokens[:length - 1] + [self.eos_id]
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        return ids, mask

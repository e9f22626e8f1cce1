"""SentencePiece text tokenizer with the special tokens the multiway model needs.

Fixed ids: [PAD]=0, <unk>=1, [T_CLS]=2, [T_SEP]=3, [MASK]=4. The specials are SentencePiece
control symbols: they are never produced from raw text, so a caption containing the string
"[MASK]" is tokenized as ordinary characters.

Training is deterministic: a fixed thread count (the result depends on it, not on the
machine's cores), a fixed seed, and no random sentence sampling; corpora over
`MAX_TRAIN_LINES` lines are thinned by an even stride instead (keeps `prepare` fast).

`vocab_size` is a soft limit (hard_vocab_limit=False): on a corpus too small for it,
SentencePiece produces a smaller vocabulary and `vocab_size` reports the real size, which
the model must use.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

PAD, UNK, T_CLS, T_SEP, MASK = "[PAD]", "<unk>", "[T_CLS]", "[T_SEP]", "[MASK]"
# Lines longer than this many bytes are split for training (SentencePiece drops long lines).
_MAX_TRAIN_LINE_BYTES = 4096
_TRAIN_SEED = 0
_TRAIN_THREADS = 2
MAX_TRAIN_LINES = 100_000


class TextTokenizer:
    """Encode text to [T_CLS] ... [T_SEP] id lists and back."""

    pad_id = 0
    unk_id = 1
    cls_id = 2
    sep_id = 3
    mask_id = 4
    special_ids = (pad_id, cls_id, sep_id, mask_id)

    def __init__(self, processor: spm.SentencePieceProcessor, path: str) -> None:
        expected = {self.pad_id: PAD, self.unk_id: UNK, self.cls_id: T_CLS, self.sep_id: T_SEP, self.mask_id: MASK}
        found = {i: processor.id_to_piece(i) for i in expected if i < processor.get_piece_size()}
        if found != expected:
            raise ValueError(f"{path}: not a vlmoe text tokenizer; special pieces {found}, expected {expected}")
        self._sp = processor
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, path: str | Path) -> "TextTokenizer":
        """Train a unigram model on `texts` and write it to `path` (a .model file).

        Multi-line texts are split into lines (SentencePiece's unit of training).
        """
        path = Path(path)
        if path.suffix != ".model":
            raise ValueError(f"text tokenizer path must end in .model, got {path}")
        if vocab_size < 16:
            raise ValueError(f"text vocab_size must be at least 16, got {vocab_size}")
        lines = [line for text in texts for line in _training_lines(text)]
        if not lines:
            raise ValueError("cannot train a text tokenizer: no non-empty text given")
        stride = -(-len(lines) // MAX_TRAIN_LINES)
        lines = lines[::stride]
        path.parent.mkdir(parents=True, exist_ok=True)
        spm.set_random_generator_seed(_TRAIN_SEED)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(path.with_suffix("")),
            model_type="unigram",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            pad_id=cls.pad_id, pad_piece=PAD,
            unk_id=cls.unk_id, unk_piece=UNK,
            bos_id=cls.cls_id, bos_piece=T_CLS,
            eos_id=cls.sep_id, eos_piece=T_SEP,
            control_symbols=[MASK],
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=_TRAIN_THREADS,
            minloglevel=2,
        )
        return cls.load(path)

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        """Load a .model file written by `train`."""
        path = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"text tokenizer model not found: {path}")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a SentencePiece model: {e}") from e
        return cls(processor, path)

    def encode(self, text: str, max_len: int) -> list[int]:
        """[T_CLS] pieces... [T_SEP]; pieces are truncated so the whole list is <= max_len."""
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (room for [T_CLS] and [T_SEP]), got {max_len}")
        pieces = self._sp.encode(text, out_type=int)[: max_len - 2]
        return [self.cls_id, *pieces, self.sep_id]

    def encode_pair(self, first: str, second: str, max_len: int) -> list[int]:
        """[T_CLS] first [T_SEP] second [T_SEP] (sentence-pair tasks); the longer side is cut
        one piece at a time until the whole list is <= max_len, as BERT truncates pairs."""
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3 for a pair ([T_CLS] and two [T_SEP]), got {max_len}")
        a, b = self._sp.encode(first, out_type=int), self._sp.encode(second, out_type=int)
        while len(a) + len(b) > max_len - 3:
            if len(a) >= len(b):
                a.pop()
            else:
                b.pop()
        return [self.cls_id, *a, self.sep_id, *b, self.sep_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the non-special ids (padding, [T_CLS], [T_SEP], [MASK] are dropped)."""
        return self._sp.decode([int(i) for i in ids if int(i) not in self.special_ids])


def _training_lines(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        line = line.strip()
        while len(line.encode("utf-8")) > _MAX_TRAIN_LINE_BYTES:
            # A UTF-8 character is at most 4 bytes: a quarter of the limit in characters fits.
            limit = _MAX_TRAIN_LINE_BYTES // 4
            cut = line.rfind(" ", 0, limit)
            cut = cut if cut > 0 else limit
            lines.append(line[:cut])
            line = line[cut:].strip()
        if line:
            lines.append(line)
    return lines

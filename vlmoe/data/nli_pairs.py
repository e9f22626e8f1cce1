"""NLI-style sentence pairs (premise, hypothesis, 3 labels) constructed from WordNet.

No English NLI data ships in any installed package, so this is a constructed dataset: each
pair is one of WordNet's own example sentences (the quoted parts of a synset's gloss) and the
same sentence with one word replaced along a WordNet relation of that synset:
  entailment     the word (a lemma of the synset) -> a hypernym of it, nouns and verbs
                 ("their parting was a sad scene" => "their parting was a sad incident");
  neutral        the same substitution read backwards: the hypernym sentence as premise, the
                 original, more specific one as hypothesis (an incident need not be a scene);
  contradiction  the word -> a WordNet antonym of it (`!` pointers, from that very lemma:
                 adjectives mostly, some adverbs, nouns and verbs; "a dry climate" versus
                 "a wet climate").
Only sentences of at most 12 words that contain the lemma verbatim as a whole word
(case-insensitive; inflected forms do not match, which keeps the substitution grammatical;
a verb only where it stands in its base form, see `substitute`) are used, and none with a
word that stops a hypernym from being entailed or an antonym from contradicting (negation,
"every", "all", "if", questions ...: NOT_UPWARD_WORDS). The hypernym replacing a word is the
first single-word lemma of the first `@` hypernym synset that has one (instance hypernyms
`@i` are not used: "Paris" => "the national capital" reads badly); an antonym is the lemma
the `!` pointer names. "a"/"an" before the replaced word is fixed. The pairs are as good as
WordNet's senses and examples: most read naturally ("a hot stove" / "a cold stove",
"park the car in the yard" => "put the car in the yard"), some are stilted ("he quit smoking
cold turkey" => "he quit smoking withdrawal") or idiomatic ("a happy medium").

Every pair's `key` names its source sentence ("noun/02084071/0": file, synset offset, index
of the example in the gloss), the first such place when a sentence occurs in several
glosses, so a split by key keeps all pairs of a sentence together. The labels are balanced
exactly by keeping, in each larger label, the pairs with the smallest content hash.

On Debian's wordnet-base (WordNet 3.0), from 16,122 usable sentences: 10,901 entailment,
10,901 neutral (7,528 of each from nouns, 3,373 from verbs) and 6,118 contradiction pairs
(4,959 adjectives, 538 adverbs, 371 nouns, 250 verbs); balanced, 6,118 of each label
(18,354 pairs from 14,182 source sentences). Building them takes about 3 s.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from vlmoe.data.sources import ADJECTIVE_MARKER, QUOTED_EXAMPLE, WORDNET_ROOT, SkipCounter, require_path

LABELS = ("entailment", "neutral", "contradiction")
MAX_WORDS = 12
WORDNET_FILES = ("noun", "verb", "adj", "adv")
_POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}  # pointer pos letter -> file
# what ends the text before a verb used in its base form (see `substitute`)
_BASE_FORM_BEFORE = re.compile(
    r"(?:^|(?<![\w-])(?:to|will|would|shall|should|can|could|may|might|must|do|does|did|let's) )$", re.IGNORECASE)
# A word in whose scope a hypernym is not entailed ("no dog" does not entail "no animal") or an
# antonym does not contradict ("not hot" vs "not cold").
NOT_UPWARD_WORDS = frozenset({
    "no", "not", "never", "nobody", "nothing", "none", "neither", "nor", "without", "cannot",
    "every", "all", "each", "any", "few", "only", "if", "unless", "whether", "less", "than",
})


class Pointer(NamedTuple):
    symbol: str  # "@" hypernym, "@i" instance hypernym, "!" antonym, ...
    target: tuple[str, str]  # (file, offset) of the synset pointed to
    source_lemma: int  # 1-based lemma number in this synset; 0 for a pointer of the whole synset
    target_lemma: int  # 1-based lemma number in the target synset; 0 likewise


class Synset(NamedTuple):
    file: str  # "noun", "verb", "adj" or "adv"
    offset: str
    lemmas: tuple[str, ...]  # "_" turned into spaces, adjective markers "(a)" dropped
    pointers: tuple[Pointer, ...]
    examples: tuple[str, ...]  # the quoted example sentences of the gloss


class Pair(NamedTuple):
    premise: str
    hypothesis: str
    label: str
    key: str


def parse_synset(line: str, file: str) -> Synset:
    """One data.<file> line; ValueError, IndexError or KeyError if it does not follow the format."""
    head, bar, gloss = line.partition(" | ")
    fields = head.split()
    if not bar or len(fields) < 6:
        raise ValueError("no gloss or too few fields")
    word_count = int(fields[3], 16)
    lemmas = tuple(ADJECTIVE_MARKER.sub("", word).replace("_", " ") for word in fields[4:4 + 2 * word_count:2])
    pointer_at = 4 + 2 * word_count
    pointer_count = int(fields[pointer_at])
    pointer_fields = fields[pointer_at + 1:pointer_at + 1 + 4 * pointer_count]
    if len(lemmas) != word_count or len(pointer_fields) != 4 * pointer_count:
        raise ValueError("fewer words or pointers than counted")
    pointers = []
    for symbol, offset, pos, source_target in zip(*[iter(pointer_fields)] * 4):
        if len(source_target) != 4:
            raise ValueError(f"bad source/target field {source_target!r}")
        pointers.append(Pointer(symbol, (_POS_FILES[pos], offset), int(source_target[:2], 16),
                                int(source_target[2:], 16)))
    examples = tuple(example.strip() for example in QUOTED_EXAMPLE.findall(gloss) if example.strip())
    return Synset(file, fields[0], lemmas, tuple(pointers), examples)


def read_synsets(root: Path, skips: SkipCounter) -> dict[tuple[str, str], Synset]:
    """(file, offset) -> Synset of the four data files, in file order; bad lines counted in `skips`."""
    synsets = {}
    for file in WORDNET_FILES:
        path = root / f"data.{file}"
        with path.open("rb") as f:
            for line_number, raw in enumerate(f, start=1):
                if raw.startswith(b"  "):  # the license header
                    continue
                try:
                    synset = parse_synset(raw.decode("utf-8"), file)
                except (UnicodeDecodeError, ValueError, IndexError, KeyError):
                    skips.skip("bad WordNet line", f"{path}:{line_number}")
                    continue
                synsets[file, synset.offset] = synset
    return synsets


def usable_sentence(sentence: str) -> bool:
    """Short, a statement, and no word in whose scope the substitutions change meaning."""
    words = {word.strip(".,;:!\"'`()") for word in sentence.lower().split()}
    return (len(sentence.split()) <= MAX_WORDS and not sentence.rstrip().endswith("?")
            and "n't" not in sentence.lower() and not NOT_UPWARD_WORDS & words)


def substitute(sentence: str, word: str, replacement: str, verb: bool = False) -> str | None:
    """`sentence` with the first whole-word occurrence of `word` (any case) replaced, else None.

    A verb counts only where English uses its base form (sentence start, after "to", a modal,
    "do" or "let's"): elsewhere the same spelling can be a past tense ("the car hit a tree")
    or a plural present ("books sell"), which a replacement verb's base form would not match;
    or not a verb at all ("the dog chased the rabbit" illustrates the verb "dog").
    A capitalised sentence-initial word stays capitalised; an "a"/"an" right before the word
    is made to fit the replacement.
    """
    matches = [match for match in re.finditer(rf"(?<![\w-]){re.escape(word)}(?![\w-])", sentence, re.IGNORECASE)
               if not verb or _BASE_FORM_BEFORE.search(sentence[:match.start()])]
    if not matches:
        return None
    match = matches[0]
    if match.start() == 0 and match.group()[0].isupper():
        replacement = replacement[:1].upper() + replacement[1:]
    before = _fit_article(sentence[:match.start()], replacement)
    return before + replacement + sentence[match.end():]


def _fit_article(before: str, next_word: str) -> str:
    article = re.search(r"(?<![\w-])(an?) $", before, flags=re.IGNORECASE)
    if article is None:
        return before
    fitting = "an" if next_word[:1].lower() in "aeiou" else "a"
    if article.group(1)[0].isupper():
        fitting = fitting.capitalize()
    return before[:article.start(1)] + fitting + " "


def hypernym_lemma(synset: Synset, synsets: dict[tuple[str, str], Synset]) -> str | None:
    """The first single-word lemma of the first `@` hypernym synset that has one."""
    for pointer in synset.pointers:
        if pointer.symbol == "@" and pointer.target in synsets:
            single_words = [lemma for lemma in synsets[pointer.target].lemmas if " " not in lemma]
            if single_words:
                return single_words[0]
    return None


def antonym_lemmas(synset: Synset, lemma_number: int, synsets: dict[tuple[str, str], Synset]) -> list[str]:
    """The lemmas the `!` pointers of lemma `lemma_number` (1-based) of `synset` name."""
    return [synsets[p.target].lemmas[p.target_lemma - 1] for p in synset.pointers
            if p.symbol == "!" and p.source_lemma == lemma_number and p.target in synsets
            and 0 < p.target_lemma <= len(synsets[p.target].lemmas)]


def sentence_pairs(sentence: str, key: str, synset: Synset,
                   synsets: dict[tuple[str, str], Synset]) -> Iterator[Pair]:
    """Every pair one example sentence of `synset` gives, one substitution per pair."""
    hypernym = hypernym_lemma(synset, synsets) if synset.file in ("noun", "verb") else None
    verb = synset.file == "verb"
    for lemma_number, lemma in enumerate(synset.lemmas, start=1):
        if hypernym is not None and hypernym.lower() != lemma.lower():
            general = substitute(sentence, lemma, hypernym, verb)
            if general is not None:
                yield Pair(sentence, general, "entailment", key)
                yield Pair(general, sentence, "neutral", key)
        for antonym in antonym_lemmas(synset, lemma_number, synsets):
            opposite = substitute(sentence, lemma, antonym, verb) if antonym.lower() != lemma.lower() else None
            if opposite is not None:
                yield Pair(sentence, opposite, "contradiction", key)


def all_pairs(synsets: dict[tuple[str, str], Synset]) -> list[Pair]:
    """Unbalanced pairs of every usable example sentence, in WordNet file order, without
    duplicates or sentences grown past MAX_WORDS by a multi-word replacement."""
    first_key: dict[str, str] = {}  # sentence -> its first place, so a repeated sentence splits alike
    seen: set[tuple[str, str]] = set()
    pairs = []
    for synset in synsets.values():
        for index, sentence in enumerate(synset.examples):
            if not usable_sentence(sentence):
                continue
            key = first_key.setdefault(sentence.lower(), f"{synset.file}/{synset.offset}/{index}")
            for pair in sentence_pairs(sentence, key, synset, synsets):
                longest = max(len(pair.premise.split()), len(pair.hypothesis.split()))
                if (pair.premise, pair.hypothesis) not in seen and longest <= MAX_WORDS:
                    seen.add((pair.premise, pair.hypothesis))
                    pairs.append(pair)
    return pairs


def balance(pairs: list[Pair]) -> list[Pair]:
    """As many pairs of each label as the rarest has: in each label those with the smallest
    content hash (stable under small changes of WordNet), in their original order."""
    def content_hash(pair: Pair) -> str:
        return hashlib.sha256(f"{pair.premise}\t{pair.hypothesis}".encode()).hexdigest()

    per_label = min(sum(pair.label == label for pair in pairs) for label in LABELS)
    kept = set()
    for label in LABELS:
        kept.update(sorted((pair for pair in pairs if pair.label == label), key=content_hash)[:per_label])
    return [pair for pair in pairs if pair in kept]


def nli_examples(root: str | Path = WORDNET_ROOT, skips: SkipCounter | None = None) -> Iterator[dict[str, str]]:
    """Balanced constructed NLI pairs from WordNet at `root`; see the module docstring.

    Each: {"premise": str, "hypothesis": str, "label": one of LABELS, "key": source sentence}.
    Unparsable data lines are counted in `skips` (if given). Raises DataError if `root` or a
    data file is missing; the pairs are built on the first `next()`.
    """
    root = require_path(root, "nli")
    for file in WORDNET_FILES:
        require_path(root / f"data.{file}", "nli")
    return _examples(root, skips if skips is not None else SkipCounter())


def _examples(root: Path, skips: SkipCounter) -> Iterator[dict[str, str]]:
    for pair in balance(all_pairs(read_synsets(root, skips))):
        yield pair._asdict()

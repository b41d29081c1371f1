"""The filter's rules: each named, each switchable, each with its own thresholds.

A rule looks at one (normalised) caption and returns None to keep it or a short reason to drop it.
Rules run in RULE_ORDER and the first that fires is the one counted, so each dropped item has
exactly one rule in the rejects file.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass, field

from mgpt4.strict_config import ConfigError

# Apologies and refusals: the fixing LLM (or the describing model) talking about itself.
REFUSAL_PATTERNS = [
    r"\bI(?:'m| am) sorry\b",
    r"\bsorry,? (?:but )?I\b",
    r"\bI (?:sincerely )?apologi[sz]e\b",
    r"\b(?:my|our) apologies\b",
    r"\bapologi[sz]e for (?:the|any) (?:confusion|error|mistake)",
    r"\bI made a mistake\b",
    r"\bas an AI\b",
    r"\bas an? (?:large )?language model\b",
    r"\bI (?:cannot|can ?not|can't|could not|couldn't) (?:see|view|provide|help|assist|fulfill|access|determine)\b",
    r"\bI(?:'m| am) (?:unable|not able) to\b",
    r"\bI don't have (?:the ability|access)\b",
]
# The fixing LLM saying there was nothing to fix instead of returning the paragraph.
ALREADY_CORRECT_PATTERNS = [
    r"\balready (?:correct|fine|accurate|error[- ]free|grammatically correct)\b",
    r"\b(?:there are|there is|contains|has|with|found) no (?:errors?|mistakes?|issues?)\b",
    r"^\s*no (?:errors?|mistakes?|changes?|corrections?)\b",
    r"\bdoes(?: not|n't) (?:contain|have|need|require) any (?:errors?|mistakes?|changes?|corrections?)\b",
    r"\bno (?:changes|corrections|fixes) (?:are |were )?(?:needed|necessary|required|made)\b",
    r"\bnothing to (?:fix|correct|change)\b",
    r"\bis correct as (?:it is|is)\b",
]
# Replies about the paragraph rather than a description of the image.
META_REPLY_PATTERNS = [
    r"\b(?:the|this|your) (?:given|input|provided|original|above|following) (?:paragraph|text|description)\b",
    r"\b(?:corrected|fixed|revised|rewritten|edited) (?:paragraph|version|text|description)\b",
    r"\bhere(?: is|'s) (?:the|a|your) (?:corrected|fixed|revised|rewritten|cleaned)\b",
    r"\bI (?:have )?(?:removed|corrected|fixed|rewrote|rewritten)\b",
]

# Frequent English words: their share of a caption's words tells English from other Latin-script text.
_COMMON_WORDS = """a about above across after against all along also am an and another any are around as at away back
    be because been before behind being below beside between both but by can could did do does down
    during each either few for from front further had has have he her here hers him his how i if in
    into is it its itself just left many may me might more most much my near next no nor not of off on
    one only onto or other our out over own right same she should side since small so some such than
    that the their them then there these they this those through to too top two under up upon us very
    was we were what when where which while white who whose why will with within without would you
    your black blue green red yellow large image picture shows appears seen background wearing"""
COMMON_ENGLISH = frozenset(_COMMON_WORDS.split())
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class PatternRule:
    enabled: bool = True
    patterns: list[str] = field(default_factory=list)  # case-insensitive regular expressions


@dataclass
class TooShortRule:
    enabled: bool = True
    min_words: int = 20
    min_chars: int = 0


@dataclass
class NotEnglishRule:
    enabled: bool = True
    # Share of letters that are Latin script (ASCII and Latin-1/Extended-A/B).
    min_latin_ratio: float = 0.9
    # Share of words found in COMMON_ENGLISH; plain English descriptions sit around 0.4-0.6.
    min_common_word_ratio: float = 0.2
    # Below this many words the word share says little; too_short handles such captions.
    min_words_to_judge: int = 5


@dataclass
class RepetitionRule:
    enabled: bool = True
    # A sentence of at least `min_sentence_words` words may appear this many times.
    max_sentence_repeats: int = 1
    min_sentence_words: int = 3
    # Share of word n-grams that repeat an earlier n-gram.
    ngram: int = 4
    max_repeated_ngram_ratio: float = 0.3
    min_ngrams_to_judge: int = 8
    # The same word may come this many times in a row ("very very" passes, "the the the" does not).
    max_word_run: int = 2


@dataclass
class RulesConfig:
    refusal: PatternRule = field(default_factory=lambda: PatternRule(patterns=list(REFUSAL_PATTERNS)))
    already_correct: PatternRule = field(
        default_factory=lambda: PatternRule(patterns=list(ALREADY_CORRECT_PATTERNS))
    )
    meta_reply: PatternRule = field(default_factory=lambda: PatternRule(patterns=list(META_REPLY_PATTERNS)))
    not_english: NotEnglishRule = field(default_factory=NotEnglishRule)
    too_short: TooShortRule = field(default_factory=TooShortRule)
    repetition: RepetitionRule = field(default_factory=RepetitionRule)


# not_english before too_short: text without spaces (Chinese, Japanese) has few "words" but is not short.
RULE_ORDER = ("refusal", "already_correct", "meta_reply", "not_english", "too_short", "repetition")


def normalise(text: str) -> str:
    """Caption as it goes into filter_cap.json: typographic quotes folded, whitespace collapsed."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = " ".join(text.split())
    # Chat models often quote the whole paragraph they return.
    if len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1]:
        text = text[1:-1].strip()
    return text


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def check_patterns(rule: PatternRule, text: str) -> str | None:
    for p in rule.patterns:
        m = re.search(p, text, flags=re.IGNORECASE)
        if m:
            return f"matches {p!r}: {m.group(0)!r}"
    return None


def check_too_short(rule: TooShortRule, text: str) -> str | None:
    n = len(words(text))
    if n < rule.min_words:
        return f"{n} words < {rule.min_words}"
    if len(text) < rule.min_chars:
        return f"{len(text)} characters < {rule.min_chars}"
    return None


def latin_ratio(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(1 for c in letters if ord(c) < 0x250) / len(letters)


def check_not_english(rule: NotEnglishRule, text: str) -> str | None:
    if not any(c.isalpha() for c in text):
        return None  # nothing to judge; too_short drops an empty caption
    ratio = latin_ratio(text)
    if ratio < rule.min_latin_ratio:
        return f"latin letter share {ratio:.2f} < {rule.min_latin_ratio}"
    ws = words(text)
    if len(ws) >= rule.min_words_to_judge:
        common = sum(1 for w in ws if w in COMMON_ENGLISH) / len(ws)
        if common < rule.min_common_word_ratio:
            return f"common English word share {common:.2f} < {rule.min_common_word_ratio}"
    return None


def check_repetition(rule: RepetitionRule, text: str) -> str | None:
    sentences = [" ".join(words(s)) for s in _SENTENCE_END.split(text)]
    counts = Counter(s for s in sentences if len(s.split()) >= rule.min_sentence_words)
    if counts:
        sentence, n = counts.most_common(1)[0]
        if n > rule.max_sentence_repeats:
            return f"sentence repeated {n} times: {sentence[:60]!r}"
    ws = words(text)
    run = 1
    for prev, cur in itertools.pairwise(ws):
        run = run + 1 if cur == prev else 1
        if run > rule.max_word_run:
            return f"{cur!r} {run} times in a row"
    grams = [tuple(ws[i : i + rule.ngram]) for i in range(len(ws) - rule.ngram + 1)]
    if len(grams) >= rule.min_ngrams_to_judge:
        repeated = 1 - len(set(grams)) / len(grams)
        if repeated > rule.max_repeated_ngram_ratio:
            return f"{repeated:.2f} of {rule.ngram}-grams repeat (> {rule.max_repeated_ngram_ratio})"
    return None


def first_rule(cfg: RulesConfig, text: str) -> tuple[str, str] | None:
    """(rule name, reason) of the first enabled rule that drops `text`, or None to keep it."""
    for name in RULE_ORDER:
        rule = getattr(cfg, name)
        if not rule.enabled:
            continue
        if isinstance(rule, PatternRule):
            reason = check_patterns(rule, text)
        elif isinstance(rule, TooShortRule):
            reason = check_too_short(rule, text)
        elif isinstance(rule, NotEnglishRule):
            reason = check_not_english(rule, text)
        else:
            reason = check_repetition(rule, text)
        if reason is not None:
            return name, reason
    return None


def validate_rules(cfg: RulesConfig) -> None:
    """Bad patterns and thresholds fail before any item is judged, naming the field."""
    for name in ("refusal", "already_correct", "meta_reply"):
        for i, p in enumerate(getattr(cfg, name).patterns):
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"rules.{name}.patterns[{i}]: not a regular expression ({e}): {p!r}") from e
    for field_name, value in (
        ("not_english.min_latin_ratio", cfg.not_english.min_latin_ratio),
        ("not_english.min_common_word_ratio", cfg.not_english.min_common_word_ratio),
        ("repetition.max_repeated_ngram_ratio", cfg.repetition.max_repeated_ngram_ratio),
    ):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"rules.{field_name}: expected a share between 0 and 1, got {value}")
    if cfg.repetition.ngram < 1 or cfg.repetition.max_word_run < 1:
        raise ConfigError("rules.repetition: ngram and max_word_run must be at least 1")

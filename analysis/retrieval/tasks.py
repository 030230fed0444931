"""Retrieval prompts: a passkey in filler, or a one-sentence fact (a "needle") in real text.

Both are built in token ids, so a prompt has exactly the requested length: ``length`` tokens of task
line, context and question; the answer (a leading space and the key or word) follows. Every piece is
tokenised on its own and concatenated, so the answer's own tokens inside the context (``tracked``) and
the needle's span are known exactly. The needle goes *back* to the last sentence boundary at or before
``depth`` % of the context (gkamradt's tester; kvpress's needle_in_haystack does it by token index).

Trial content depends only on (seed, task, length, trial), not on the depth: the same key or fact
and the same haystack appear at every depth, so depths (and methods) are compared paired by trial.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from analysis.errors import UserError
from analysis.text.corpora import bos_id, token_sequences

TASKS = ("passkey", "needle")

# the passkey template (landmark attention / LongLoRA's passkey_retrivial.py), words as the issue gives them
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

NEEDLE_TASK = "Read the text below. One sentence in it states a fact; I will ask about it at the end.\n\n"


@dataclass(frozen=True)
class Needle:
    """A fact "{cloze} {answer}." hidden in the text; the prompt ends "{question} ... {cloze}"."""

    cloze: str
    answer: str
    question: str


# invented facts, none answerable from the corpora or from common knowledge, answers all different
NEEDLES = (
    Needle("The secret ingredient of Mrs. Bennet's pie is", "cardamom",
           "What is the secret ingredient of Mrs. Bennet's pie?"),
    Needle("The name of Captain Harville's dog is", "Biscuit", "What is the name of Captain Harville's dog?"),
    Needle("The colour of the door of the old mill is", "turquoise", "What is the colour of the door of the old mill?"),
    Needle("The password to the library at Pemberley is", "walnut",
           "What is the password to the library at Pemberley?"),
    Needle("The favourite fruit of the ship's cook is the", "apricot",
           "What is the favourite fruit of the ship's cook?"),
    Needle("The river the travellers crossed at dawn was the", "Severn",
           "Which river did the travellers cross at dawn?"),
    Needle("The instrument Colonel Brandon plays is the", "oboe", "Which instrument does Colonel Brandon play?"),
    Needle("The name of the innkeeper's horse is", "Thunder", "What is the name of the innkeeper's horse?"),
    Needle("The gemstone in the duchess's ring is a", "sapphire", "What is the gemstone in the duchess's ring?"),
    Needle("The city where the old professor was born is", "Lisbon", "In which city was the old professor born?"),
    Needle("The number painted on the blue boat is", "47", "What number is painted on the blue boat?"),
    Needle("The spice merchant's daughter is called", "Rosalind", "What is the spice merchant's daughter called?"),
)

_ABBREVIATION = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Mt|No|vs|etc|i\.e|e\.g)\.[\"'”’)]*$")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)]*$")


@dataclass(frozen=True)
class Prompt:
    """One trial's prompt in token ids.

    ``ids`` (length,) are task line, context and question; ``answer`` the answer's ids (scored after
    ``ids``). ``tracked`` are the positions in ``ids`` of the fact's answer tokens (every occurrence:
    the passkey appears twice), ``needle`` the [start, stop) span of the inserted sentence and
    ``question`` the index where the question starts.
    """

    task: str
    length: int
    depth: int
    trial: int
    ids: tuple[int, ...]
    answer: tuple[int, ...]
    answer_text: str
    tracked: tuple[int, ...]
    needle: tuple[int, int]
    question: int
    source: str


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def bos(tokenizer) -> list[int]:
    """[the BOS id] where the tokenizer starts every text with one (Gemma needs it first), else []."""
    found = bos_id(tokenizer)
    return [] if found is None else [found]


def blank_tokens(tokenizer) -> set[int]:
    """Ids of a lone space (how byte-level tokenizers start " 43918"): not part of the fact itself."""
    return {t for t in encode(tokenizer, " 0") if not tokenizer.decode([t]).strip()}


def trial_rng(seed: int, task: str, length: int, trial: int) -> random.Random:
    """The draws of one trial: the same at every depth (str seeds hash the same on every run)."""
    return random.Random(f"kvlens-retrieval/{seed}/{task}/{length}/{trial}")


def check_depths(depths: list[int]) -> list[int]:
    bad = [d for d in depths if not 0 <= d <= 100]
    if bad:
        raise UserError(f"--depths are percentages of the context, 0 to 100; got {bad[0]}")
    if not depths:
        raise UserError("--depths: give at least one depth")
    return depths


def sentence_starts(tokenizer, ids: list[int]) -> list[int]:
    """Indices i where a sentence starts at token i: 0, and after a token ending a sentence (not "Mrs.");
    ``len(ids)`` too when the text ends a sentence (a haystack cut mid-sentence does not)."""
    pieces = tokenizer.batch_decode([[t] for t in ids])
    starts = [0]
    text = ""
    for i, piece in enumerate(pieces):
        text = (text + piece)[-24:]  # the recent characters, enough to see "Mrs." split over tokens
        nxt = pieces[i + 1] if i + 1 < len(pieces) else " "
        ends = _SENTENCE_END.search(text.rstrip()) and not _ABBREVIATION.search(text.rstrip())
        if ends and (nxt[:1].isspace() or text[-1:].isspace()):
            starts.append(i + 1)
    return starts


def insertion_point(starts: list[int], size: int, depth: int) -> int:
    """The last sentence start at or before ``depth`` % of ``size`` context tokens."""
    target = round(size * depth / 100)
    return max(s for s in starts if s <= target)


def _assemble(task: str, length: int, depth: int, trial: int, head: list[int], context: list[int],
              starts: list[int], needle: list[list[int]], answer_piece: set[int], question: list[int],
              answer: list[int], answer_text: str, source: str, blank: set[int]) -> Prompt:
    """head + context[:at] + needle pieces + context[at:] + question, ``needle`` given as its pieces."""
    at = insertion_point(starts, len(context), depth)
    ids = head + context[:at]
    start = len(ids)
    tracked = []
    for k, piece in enumerate(needle):
        if k in answer_piece:  # the answer's tokens, but not a lone space token before digits
            tracked += [len(ids) + i for i, t in enumerate(piece) if t not in blank]
        ids += piece
    stop = len(ids)
    ids += context[at:]
    q = len(ids)
    ids += question
    assert len(ids) == length, (len(ids), length)
    return Prompt(task, length, depth, trial, tuple(ids), tuple(answer), answer_text, tuple(tracked), (start, stop),
                  q, source)


def passkey_prompt(tokenizer, length: int, depth: int, trial: int, seed: int = 0) -> Prompt:
    """The passkey template at ``length`` tokens with a random 5-digit key at ``depth`` % of the filler."""
    key = str(trial_rng(seed, "passkey", length, trial).randint(10000, 99999))
    head, question = bos(tokenizer) + encode(tokenizer, PASSKEY_TASK), encode(tokenizer, PASSKEY_QUESTION)
    needle = [encode(tokenizer, t) for t in (" The pass key is", f" {key}", ". Remember it.", f" {key}",
                                             " is the pass key.")]
    room = length - len(head) - sum(map(len, needle)) - len(question)
    if room < 0:
        raise UserError(f"--lengths {length} is too short for the passkey template "
                        f"({length - room} tokens without filler)")
    unit = encode(tokenizer, PASSKEY_FILLER)
    filler = (unit * (room // len(unit) + 1))[:room]
    return _assemble("passkey", length, depth, trial, head, filler, sentence_starts(tokenizer, filler), needle,
                     {1, 3}, question, encode(tokenizer, f" {key}"), key, "filler", blank_tokens(tokenizer))


def needle_prompt(tokenizer, haystack: tuple[str, list[int]], length: int, depth: int, trial: int,
                  seed: int = 0) -> Prompt:
    """A fact drawn from ``NEEDLES`` in the haystack (doc id, ids) cut to fit ``length`` tokens."""
    fact = NEEDLES[trial_rng(seed, "needle", length, trial).randrange(len(NEEDLES))]
    head = bos(tokenizer) + encode(tokenizer, NEEDLE_TASK)
    needle = [encode(tokenizer, " " + fact.cloze), encode(tokenizer, " " + fact.answer), encode(tokenizer, ".")]
    question = encode(tokenizer, needle_question(fact))
    room = length - len(head) - sum(map(len, needle)) - len(question)
    doc, ids = haystack
    if room < 1 or len(ids) < room:
        raise UserError(f"--lengths {length}: the haystack text {doc} has {len(ids)} tokens, "
                        f"{max(room, 1)} are needed")
    context = list(ids[:room])
    return _assemble("needle", length, depth, trial, head, context, sentence_starts(tokenizer, context), needle,
                     {1}, question, encode(tokenizer, " " + fact.answer), fact.answer, doc, blank_tokens(tokenizer))


def needle_question(fact: Needle) -> str:
    return f"\n\nQuestion: {fact.question}\nAnswer: {fact.cloze}"


def protected_from(tokenizer, task: str, length: int) -> int:
    """Where compression stops when the question is kept out of it (``--protect-question``).

    The passkey's question start, exactly; for needles, the earliest over the whole set, so that one
    step serves every row of a batch (a needle with a shorter question keeps its last few context
    tokens uncompressed). It depends only on the task and length, never on the batching.
    """
    if task == "passkey":
        return length - len(encode(tokenizer, PASSKEY_QUESTION))
    return length - max(len(encode(tokenizer, needle_question(f))) for f in NEEDLES)


def haystacks(tokenizer, docs, length: int, trials: int) -> list[tuple[str, list[int]]]:
    """One haystack per trial (doc id, ``length`` ids): different documents first, then further chunks."""
    try:
        found = token_sequences(tokenizer, docs, length, trials)
    except UserError:
        longest = max(len(encode(tokenizer, d.text[: length * 8])) for d in docs)
        raise UserError(f"--lengths {length}: the haystack text is too short (its longest document has "
                        f"{longest} tokens)") from None
    first = bos(tokenizer)  # token_sequences starts each with the BOS: the prompt's head has it, not the haystack
    found = [(doc, ids[len(first):] if first and ids[: len(first)] == first else ids) for doc, ids in found]
    return [found[t % len(found)] for t in range(trials)]

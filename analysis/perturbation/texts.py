"""The text of a perturbation study: a named corpus, the user's own text, or, when neither is given,
the mix of books and web the paper's Fig. 2 averages over. The command, the Perturbation page, the
figure registry and the starter set all take their sequences from here, so "the mix" is one thing.
"""

from __future__ import annotations

from analysis.errors import UserError
from analysis.text.corpora import load_documents, token_sequences

MIXED = ("books", "web")  # corpora used when none is named


def study_source(corpus: str | None = None, text: str | None = None) -> dict:
    """What a study records as its text: {"text": ...}, {"corpus": ...} or {"corpora": [books, web]}."""
    if text:
        return {"text": text}
    if corpus:
        return {"corpus": corpus}
    return {"corpora": list(MIXED)}


def split_count(count: int, parts: int) -> list[int]:
    """``count`` sequences shared out as evenly as possible, the earlier parts taking the remainder."""
    return [count // parts + (i < count % parts) for i in range(parts)]


def study_sequences(tokenizer, tokens: int, count: int, corpus: str | None = None, text: str | None = None,
                    mode: str = "sweep", load=load_documents) -> list[tuple[str, list[int]]]:
    """``count`` sequences of ``tokens`` tokens: from ``text``, ``corpus``, or split between books and web.

    ``load(corpus=...)`` / ``load(text=...)`` gives the documents (the starter set puts Austen first);
    ``mode`` only words the error of a text too short ('t0 + N' in fig2, '--tokens' otherwise).
    """
    source = study_source(corpus, text)
    sources = [{"corpus": c} for c in source["corpora"]] if "corpora" in source else [source]
    out: list[tuple[str, list[int]]] = []
    for part, n in zip(sources, split_count(count, len(sources))):
        if n == 0:
            continue
        try:
            out += token_sequences(tokenizer, load(**part), tokens, n)
        except UserError as err:
            what, name = "t0 + N" if mode == "fig2" else "--tokens", next(iter(part.values()))
            raise UserError(f"{what} = {tokens} tokens is beyond the text ({name}): {err}") from None
    return out

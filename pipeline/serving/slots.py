"""[slot] prompts of a request: "a [dog] next to a [cat]" names two subjects, each drawn where
its name stands (pipeline/model/prompts.py). A slot is filled by the request's subjects of its
category, mixed by their weights, as `subjectforge generate --subject` fills them: a zero-shot
subject or a registered one fills the slot of its category, and a `mix`'s parts fill theirs.
Every slot needs a subject and every subject a slot. A textual-inversion subject's prompt
keeps its brackets: "[S]" is its learned word there, not a slot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.model.prompts import PromptError, SlotPrompt, has_subject_slots, split_subject_slots
from pipeline.serving.requests import RequestError
from pipeline.serving.subjects import (
    CATEGORY_FIELD,
    MIX_FIELD,
    SUBJECT_FIELD,
    WEIGHTS_RULE,
    MixedSubject,
    RegisteredSubject,
    SubjectUnusable,
    ZeroShotSubject,
    weights_add_up,
)

PROMPT_FIELD = "prompt"


@dataclass(frozen=True)
class SlotPart:
    """One subject of a slot request: the request field that gave it, the subject (resolved),
    the slot it fills (its category) and its weight within that slot."""

    field: str
    subject: RegisteredSubject | ZeroShotSubject
    category: str
    weight: float


def match_slots(prompt: str, subject: Any) -> SlotPrompt | None:
    """The slots of `prompt` when it names its subjects in them, else None (no brackets, or a
    textual-inversion subject). `subject` is resolved: a ZeroShotSubject, a RegisteredSubject or
    a MixedSubject of those. RequestError names the field: `prompt` for a malformed slot or one
    no subject fills, the subject's field for a subject no slot names, `mix` for a slot whose
    parts' weights break subjects.WEIGHTS_RULE. SubjectUnusable for a registered subject
    without subject embeddings (dreambooth)."""
    if not has_subject_slots(prompt) or (isinstance(subject, RegisteredSubject) and subject.spec.ti_property is not None):
        return None
    try:
        slots = split_subject_slots(prompt)
    except PromptError as exc:
        raise RequestError(PROMPT_FIELD, str(exc)) from None
    parts = slot_parts(subject)
    for part in parts:
        if part.category not in slots.names:
            named = ", ".join(f"[{name}]" for name in dict.fromkeys(slots.names))
            raise RequestError(part.field, f"subject {part.category!r} has no slot: the prompt names {named}; write "
                               f"[{part.category}] where it goes (a slot is filled by the subjects of its category)")
    given = {part.category for part in parts}
    for name in slots.names:
        if name not in given:
            raise RequestError(PROMPT_FIELD, f"names subject [{name}], which no subject fills; the subjects' categories are "
                               f"{', '.join(sorted(given))}")
        if not weights_add_up([part.weight for part in parts if part.category == name]):
            raise RequestError(MIX_FIELD, f"the weights of the [{name}] parts {WEIGHTS_RULE}")
    return slots


def slot_parts(subject: Any) -> list[SlotPart]:
    """The subjects of a slot request (see match_slots), each with its field, slot and weight."""
    if isinstance(subject, ZeroShotSubject):
        return [SlotPart(CATEGORY_FIELD, subject, subject.category, 1.0)]
    if isinstance(subject, RegisteredSubject):
        if subject.embeds is None:
            raise SubjectUnusable(f"models:/{subject.key} is a {subject.spec.method} subject: it has no subject embeddings to "
                                  "put in a [slot]; write its prompt without brackets")
        return [SlotPart(SUBJECT_FIELD, subject, subject.spec.category, 1.0)]
    if isinstance(subject, MixedSubject):
        return [
            SlotPart(f"{MIX_FIELD}[{i}].{CATEGORY_FIELD if isinstance(part, ZeroShotSubject) else SUBJECT_FIELD}", part,
                     part.category if isinstance(part, ZeroShotSubject) else part.spec.category, weight)
            for i, (part, weight) in enumerate(zip(subject.parts, subject.weights, strict=True))
        ]
    raise TypeError(f"not a resolved subject: {type(subject).__name__}")

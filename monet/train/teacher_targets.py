"""What each distilling SFT stage learns from its teacher, defined once.

Stage 2 aligns the student's observation-position states with the stage-1 model run on the
stage-1 layout (``teacher-reps``); stage 3 aligns its latent-position states with the stage-2
model run on the stage-2 layout (``teacher-latents``). The trainer, the precompute command and the
teacher store all read this table, so the pairing cannot drift between them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TeacherTarget:
    """One row of the table.

    ``student_stage``: the stage being trained; ``teacher_stage``: the layout the frozen teacher
    runs (and whose weights it uses); ``positions``: ``"observation"`` or ``"latent"`` (which
    positions are aligned, see :mod:`monet.data.alignment`); ``store_kind``: the teacher-store
    ``kind``; ``precompute``: the ``monet precompute`` target that writes such a store.
    """

    student_stage: int
    teacher_stage: int
    positions: str
    store_kind: str
    precompute: str


TARGETS: tuple[TeacherTarget, ...] = (
    TeacherTarget(student_stage=2, teacher_stage=1, positions="observation", store_kind="observation_reps",
                  precompute="teacher-reps"),
    TeacherTarget(student_stage=3, teacher_stage=2, positions="latent", store_kind="latents",
                  precompute="teacher-latents"),
)

#: Teacher-store kinds, in table order.
STORE_KINDS: tuple[str, ...] = tuple(t.store_kind for t in TARGETS)
#: ``monet precompute`` targets, in table order.
PRECOMPUTE_TARGETS: tuple[str, ...] = tuple(t.precompute for t in TARGETS)


def for_stage(stage: int) -> TeacherTarget | None:
    """The target of student ``stage`` (None for stage 1, which has no teacher)."""
    return next((t for t in TARGETS if t.student_stage == stage), None)


def for_precompute(what: str) -> TeacherTarget:
    for t in TARGETS:
        if t.precompute == what:
            return t
    raise ValueError(f"unknown precompute target {what!r}; expected one of {list(PRECOMPUTE_TARGETS)}")


def for_store_kind(kind: str) -> TeacherTarget | None:
    return next((t for t in TARGETS if t.store_kind == kind), None)

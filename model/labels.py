"""The one label resolver of the project: a class label as a user gives it (a class name, an index,
or an index written as a string) -> the class index the networks take.  The CLI, the API's checks
(service/routes/common.py, which give the job the class name) and the job functions all call
``label_index``.  Imports nothing heavy (the API process in Celery mode has no torch)."""

from __future__ import annotations

from collections.abc import Sequence


class LabelError(ValueError):
    """A label that does not fit the model; the message says what would."""


def label_index(class_names: Sequence[str], label: str | int | None) -> int | None:
    """The class index of ``label`` for a model with ``class_names`` (None: not class-conditional).

    A class-conditional model needs a label (its name, or its index 0..k-1, also as a digit string);
    any other model takes none (None or "").  ``LabelError`` otherwise."""
    names = list(class_names)
    if label is None or label == "":
        if names:
            raise LabelError(f"this model is class-conditional: give label, one of {names}")
        return None
    if not names:
        raise LabelError("this model is not class-conditional; do not give a label")
    if isinstance(label, str) and label in names:
        return names.index(label)
    if isinstance(label, str) and label.isascii() and label.isdigit():  # ("²".isdigit(), but no int)
        label = int(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
        return label
    raise LabelError(f"unknown label {label!r}; this model's classes: {names} (or their index)")


__all__ = ["LabelError", "label_index"]

"""Every error the library raises on purpose, and the exit code each one means.

One base, `VaeAnomalyError`, carries `exit_code`; the CLI maps it to a
message and that code in one place (`cli.main`). A bug (a `TypeError`, an
`AssertionError`) is none of these, so it still surfaces as a traceback
instead of passing for a user's mistake.

| code | class | meaning |
| ---- | ----- | ------- |
| 2 | `UsageError` and its subclasses | bad option, path, model file, document or output |
| 1 | `TrainingError` | `fit` could not train (e.g. the loss diverged) |
| 128 + signal | `FitInterrupted` | `fit` was stopped before a usable model existed |

`score`'s own outcomes (0 passed, 1 gate failed, 3 unreadable inputs) are
not errors: they are `report.Report.return_code`.
"""

from __future__ import annotations


class VaeAnomalyError(Exception):
    """Base of every deliberate error; `exit_code` is the process exit code it maps to."""

    exit_code: int = 2


class UsageError(VaeAnomalyError):
    """Something the user gave cannot be used as given; the message says what and how to fix it."""

    exit_code = 2


class ConfigError(UsageError, ValueError):
    """A configuration field out of its range: names the field, the allowed values and the value received."""


class GateSpecError(ConfigError):
    """A --gate rule that cannot be parsed; the message lists the valid forms."""


class InputPathError(UsageError):
    """An input path does not exist or holds no images: the user's mistake to fix."""


class ImageReadError(VaeAnomalyError):
    """A single file could not be decoded; its message is the reason. Becomes a record, never an exit."""


class FitError(UsageError):
    """Fitting cannot proceed with these images or options; the message says why and what to do."""


class CalibrationError(UsageError):
    """A decision was asked for that the model's calibration cannot support."""


class ModelFileError(UsageError):
    """A model file is missing, damaged, foreign or from a newer version; says which and why."""


class DocumentError(UsageError):
    """A JSON report given as input (--baseline, a shard) is not one this version can use."""


class BaselineError(DocumentError):
    """A --baseline report that cannot be compared with this run; the message says why."""


class MergeError(DocumentError):
    """Reports that cannot be merged into one; the message names the file and what to do."""


class LabelsError(UsageError):
    """The labelled data cannot be used as given; the message says where and what to fix."""


class OutputError(UsageError):
    """A report, picture or model file cannot be written; names the path and the system's reason."""


class DistributedError(UsageError):
    """The torchrun job cannot be joined as asked; the message says what to change."""


class MissingExtraError(UsageError, ImportError):
    """An optional dependency (matplotlib) is not installed; the message says how to install it."""


class TrainingError(VaeAnomalyError):
    """Training cannot go on (a NaN loss, say); the message says what to try."""

    exit_code = 1


class FitInterrupted(VaeAnomalyError):
    """Training was asked to stop before a usable model existed; the message says how to resume.

    The CLI exits with 128 + the signal's number (130 for Ctrl-C).
    """

    exit_code = 130

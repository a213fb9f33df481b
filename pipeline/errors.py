"""Every error `sdft` reports to its user as one line, with the CLI's exit code on the class (pipeline/cli.py `main`).

* `UserError` (exit 2, `sdft: error: ...`): the input cannot be used — a config, data file, model, output folder or
  checkpoint; the message says what to fix, nothing ran or nothing was lost.
* `RunFailed` (exit 1, `sdft: run failed: ...`): a run that started and could not go on — an actor died, training
  diverged, a guard stopped it; the message says why and where its checkpoints are.

A leaf module (it imports nothing of the project), so that every layer, `actors/` included, may raise these. Each
class keeps ValueError (user errors) or RuntimeError (run failures) as a second base: code and tests that catch
those still catch it.
"""

from __future__ import annotations


class SdftError(Exception):
    """An error the CLI prints as `{prefix}: {message}` and exits with `exit_code`, without a traceback."""

    exit_code = 1
    prefix = "sdft: run failed"


class UserError(SdftError):
    exit_code = 2
    prefix = "sdft: error"


class RunFailed(SdftError):
    exit_code = 1
    prefix = "sdft: run failed"


# --- user errors: exit 2 ---


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the file and key."""


class DataError(UserError, ValueError):
    """Bad input data; the message names the file and line (or dataset row)."""


class EvalError(UserError, ValueError):
    """An eval metric or eval set that cannot be used."""


class ModelNotFound(UserError, ValueError):
    """`model.path` names no model folder, hub id or built-in model."""


class OutputError(UserError, ValueError):
    """The output folder cannot be used as asked; the message says what to do."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is damaged, unverifiable, unsafe to load or from another config; the message says which
    file or keys, and what to do."""


# --- run failures: exit 1 ---


class LearnerFailed(RunFailed, RuntimeError):
    """A learner rank died or raised during a step."""


class LearnerStalled(LearnerFailed):
    """A learner rank made no progress for ray.stall_timeout_s outside its step (a weight export, a save, a greedy
    check); the driver adds the last checkpoint to the message."""


class EngineFailed(RunFailed, RuntimeError):
    """A rollout engine could not be restarted or kept failing."""


class PlacementError(RunFailed, RuntimeError):
    """The cluster cannot place the actors the config asks for."""


class SyncMismatch(RunFailed, RuntimeError):
    """After a weight push the engines do not generate what the learner does (`sync.check_greedy`)."""


class TrainingDiverged(RunFailed, RuntimeError):
    """Non-finite losses or gradients beyond what `train.on_nonfinite` allows."""


class ForgettingLimit(RunFailed, RuntimeError):
    """The forgetting monitor's KL to the base passed `monitor.max_kl`."""


class TeacherGateFailed(RunFailed, RuntimeError):
    """The teacher is not better than the student by `gate.min_margin` (`gate.enforce`)."""


class CheckpointWriteFailed(RunFailed, RuntimeError):
    """A checkpoint could not be written (a full disk, ...); nothing of it is left behind."""


class OutputLost(RunFailed, RuntimeError):
    """The output folder was removed or made unwritable while the run wrote into it."""


USER_ERRORS = (ConfigError, DataError, EvalError, ModelNotFound, OutputError, CheckpointError)
RUN_FAILURES = (LearnerFailed, LearnerStalled, EngineFailed, PlacementError, SyncMismatch, TrainingDiverged,
                ForgettingLimit, TeacherGateFailed, CheckpointWriteFailed, OutputLost)

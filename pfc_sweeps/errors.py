"""Job-level failures that are reported as one line (see ``pfc_sweeps.jobs.dispatch.main``)."""

__all__ = ["Diverged", "PFCError"]


class PFCError(RuntimeError):
    """A job-level failure with a one-line explanation."""


class Diverged(PFCError):
    """The training loss became NaN or inf; the job is recorded with status ``diverged``."""

"""Measuring: which parameters are measured and under which layer names (``layers``), their fused norms
(``norms``), and the :class:`Meter` that turns one logging step's gradients, weights and block-flow norms
into one :class:`~gradwatch.StepRecord` with one device-to-host transfer (``meter``); ``order`` records the
order in which layers first run.

This package re-exports nothing: :mod:`gradwatch.flow` builds on ``norms`` while ``meter`` builds on
:mod:`gradwatch.flow`, so each module is imported by its own name."""

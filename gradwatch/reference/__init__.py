"""Reference networks, generated data and the demo: what gradwatch is shown and checked on. Not monitoring
code: nothing in the monitoring modules imports this package.

- :mod:`gradwatch.reference.blocks`: CIFAR-style ResNets (post-, pre-activation,
  bottleneck, plain) and planted skip faults;
- :mod:`gradwatch.reference.data`: generated images with a learnable signal;
- :mod:`gradwatch.reference.gpt`: a tiny pre-LN transformer and a generated language, for the instability
  suite (:mod:`gradwatch.reference.instability`);
- :mod:`gradwatch.reference.demo`: ``gradwatch demo`` and the training recipe the tests and calibration share.
"""

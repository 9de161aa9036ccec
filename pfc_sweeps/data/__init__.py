"""Data sets for the PFC experiments (paper section IV-A).

- :mod:`.bundles`: the in-memory and streamed sets as the jobs batch them;
- :mod:`.builtin`: digits, the Gaussian mixture and the torchvision sets;
- :mod:`.module`: ``dataset=module``, any map-style data set from ``_target_`` nodes.
"""

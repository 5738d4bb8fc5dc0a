"""Export a trained model as a diffusers folder (``scripts/export.py``) and load one back.

:mod:`ldm.export.keymap`, :mod:`ldm.export.configs`, :mod:`ldm.export.card` and
:mod:`ldm.export.folder` work without diffusers (an exported folder samples with this project's
CLI); :mod:`ldm.export.exporter` and the shipped :mod:`ldm.export.templates` need the
``[export]`` extra.
"""

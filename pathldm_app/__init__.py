"""PathLDM's local web app for pathologists: generate, review summaries, run a reader study.

Start it with ``pathldm-app`` (:mod:`pathldm_app.cli`); it needs the ``app`` extra
(``pip install -e ".[app]"``).
"""

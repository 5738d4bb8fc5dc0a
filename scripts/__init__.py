"""The command-line tools; ``python scripts/<name>.py`` and the ``pathldm-*`` commands run them."""

"""Sub-commands of the ``icam-med`` CLI (one module each; see :mod:`icam_med.cli`)."""

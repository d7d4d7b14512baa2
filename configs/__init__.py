"""Run configs shipped with icam-med (package data ``icam_med.configs`` in a wheel; see
icam_med.resources). Pass one by name: ``icam-med explain SCAN --config demo``."""

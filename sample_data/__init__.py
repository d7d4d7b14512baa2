"""The demo model (weights, model card, training record) shipped with icam-med (package data
``icam_med.sample_data`` in a wheel; see icam_med.resources). The sample scans are generated
into ``scans/`` (not shipped): icam_med.evaluation.samples."""

"""Evaluation and development tools: synthetic lesion volumes (the demo's generator and the
harder benchmark of issue 11 with dark and bright lesions, distractors and healthy twins), a
synthetic DICOM series writer, synthetic radiographs with a known finding (the 2-D suite
of ``icam-med evaluate --suite radiographs``), map-quality metrics, reference maps
(baselines and controls), the method evaluation (``icam-med evaluate``), the training of the evaluation models, and the
speed and memory benchmark (``icam-med bench``).

Nothing in the explain/audit path imports this subpackage; it is for measuring the
method, building sample data and testing.
"""

"""Evaluation and development tools: synthetic lesion volumes, a synthetic DICOM series
writer, map-quality metrics, the method evaluation (``icam-med evaluate``) and the speed and
memory benchmark (``icam-med bench``).

Nothing in the explain/audit path imports this subpackage; it is for measuring the
method, building sample data and testing.
"""

"""Evaluation: exact metrics, the evaluation protocols (`evaluate`) and calibration of decision thresholds."""

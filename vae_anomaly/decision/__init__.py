"""Deciding: conformal calibration, the combined statistic, the tail model, thresholds and the rule,
the property checks and their reasons, batch tests and the gate. No torch."""

"""The method: the five stages of a cross-examination audit (features, CKA alignment, trigger
inversion, sensitivity, the calibrated verdict), the interface each learning paradigm
implements (`stages.ParadigmAudit`), and the calibration of its thresholds on clean pairs."""

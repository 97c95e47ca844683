"""The mathematics on tensors: likelihoods, estimator declarations, per-entry terms, running statistics, bounds."""

"""Cross-site evaluation: the evaluator that scores every model at every site, BatchNorm
recalibration for FedBN-style models, model selection on validation, the matrix and results.json."""

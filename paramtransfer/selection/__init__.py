"""Source selection: which trained model should a target transfer from?

``lps``: Learnable Parameter Similarity (filter alignment, the second-order network, model sets).
``scores``: fast transferability scores computed from a source model's features or predictions on the
target data (LogME, LEEP, NCE, H-score).
"""

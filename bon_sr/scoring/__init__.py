"""Scoring: each candidate's score from the frozen model's hidden states.

    hidden_states.py  the rows of the scored token set at a layer/norm, on transformers
    variants.py       transforms of H before its stable rank (centring, massive dims, ...)
    stable_rank.py    SR(H) = ||H||_F^2 / ||H||_2^2: the exact reference and the SVD-free estimator
    sr_core.py        the subspace-iteration core the torch and Triton estimators share
    kernels/          the optional fused Triton product (CUDA)
    scorers.py        one score dict per candidate (SR, its parts, token statistics); HFScorer
    pooling.py        the same scores from a vLLM pooling engine

The hook (``bon_sr.hook``) computes the same scores inside vLLM's sampling pass and uses the
math here. This package knows nothing about how candidates were sampled or how one is picked:
it turns token ids into numbers.
"""

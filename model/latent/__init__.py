"""Latent-space tools (model/latent/directions.py); this module stays free of torch, so the API's
schemas can take the defaults from here."""

# traverse with a target: rounds of generating and measuring that correct the linear model's step so
# the measured attribute ends at the target (directions.reach_target; 0: the linear step alone)
REFINE_ROUNDS = 3

# encode: Adam steps on the latent after the amortised encoder (model/latent/fit.py); 0: the encoder
# alone.  The learning rate is in the latent's units (the prior's spread is 1)
FIT_LR = 0.05
MAX_FIT_STEPS = 1000


def fit_steps_problem(steps: int, family: str, projection: bool) -> str | None:
    """Why ``steps`` cannot go to the ``encode`` of a ``family`` model (None where it can): 0 to
    ``MAX_FIT_STEPS``, at least 1 where the family encodes by ``projection``.  The CLI and the API
    both ask here."""
    least = 1 if projection else 0
    if least <= steps <= MAX_FIT_STEPS:
        return None
    how = " (it encodes by projection)" if projection else ""
    return f"steps must be {least} to {MAX_FIT_STEPS} for a {family} model{how}, got {steps}"

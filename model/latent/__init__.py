"""Latent-space tools (model/latent/directions.py); this module stays free of torch, so the API's
schemas can take the defaults from here."""

# traverse with a target: rounds of generating and measuring that correct the linear model's step so
# the measured attribute ends at the target (directions.reach_target; 0: the linear step alone)
REFINE_ROUNDS = 3

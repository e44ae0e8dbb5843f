"""Latent-space tools (model/latent/directions.py); this module stays free of torch, so the API's
schemas can take the defaults from here."""

# traverse with a target: rounds of generating and measuring that correct the linear model's step so
# the measured attribute ends at the target (directions.reach_target; 0: the linear step alone)
REFINE_ROUNDS = 3

# encode: Adam steps on the latent after the amortised encoder (model/latent/fit.py); 0: the encoder
# alone.  The learning rate is in the latent's units (the prior's spread is 1)
FIT_LR = 0.05
MAX_FIT_STEPS = 1000

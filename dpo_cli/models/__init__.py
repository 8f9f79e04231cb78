"""Models: one model built from a recipe section (build), the models each algorithm runs (roles), what
final/ holds and how frozen models load (io), where a model comes from (sources), log-probs without
full logits (forward), sampling (generate) and PPO's rollouts (rollout)."""

"""The reward model learned from clinicians' K-way rankings: data, the Plackett-Luce-fitted
head, and the per-workspace advisor that suggests orders."""

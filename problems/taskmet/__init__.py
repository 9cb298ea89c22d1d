"""TaskMet (Bansal et al. 2023) against MSE, decision-focused learning and LODL on the Cubic,
Budget and Portfolio predict-then-optimise problems of Shah et al. (2022)."""

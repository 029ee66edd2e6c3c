"""Dropless Mixture-of-Experts: router, dispatch, experts, combine, and their losses."""

from moetrain.moe.layer import LocalExchange, MoELayer, RouterStats, sequence_balance_loss
from moetrain.moe.losses import load_balancing_loss, router_z_loss, sequence_balance_loss_mean

__all__ = [
    "LocalExchange",
    "MoELayer",
    "RouterStats",
    "load_balancing_loss",
    "router_z_loss",
    "sequence_balance_loss",
    "sequence_balance_loss_mean",
]

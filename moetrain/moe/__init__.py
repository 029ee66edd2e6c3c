"""Dropless Mixture-of-Experts: router, dispatch, experts, combine, and their losses."""

from moetrain.moe.layer import LocalExchange, MoELayer, RouterStats
from moetrain.moe.losses import load_balancing_loss, router_z_loss

__all__ = ["LocalExchange", "MoELayer", "RouterStats", "load_balancing_loss", "router_z_loss"]

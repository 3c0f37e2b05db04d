"""ipsec-rollout: staged host-to-host IPsec rollouts with health gates, and a global kill switch."""

__version__ = "0.1.0"
